"""The simulator against a real mosquitto, checked by a plain paho subscriber.

The subscriber's view is decoded here by an independent, strict reader of each
device format (not the project's parsers), so these tests check the wire
format, the fault injection and the ground-truth arithmetic from the outside.
The last tests feed the same messages to ``monitor.intake.parsers``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import re
import threading
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from monitor import config as config_mod
from monitor.core.model import ParseError
from sim import simulate as sim
from sim.simulate import Fleet, MemorySink, SimOptions, Simulator, Truth
from tests.servers import Mosquitto, free_port

START = 1_764_208_800.0  # 2025-11-27T02:00:00Z
ALL = config_mod.FORMATS
TWO_MESSAGE_FORMATS = {"shelly_gen1", "esphome", "emonhub", "mbmd"}
UNITS_PER_KWH = {
    "json": 1000, "tasmota": 1000, "shelly_gen1": 60_000, "shelly_gen2": 1_000_000,
    "zigbee2mqtt": 100, "esphome": 1000, "emonhub": 1000, "mbmd": 1000,
}


# --------------------------------------------------------------------------- a subscriber


class Capture:
    """A plain paho subscriber to ``#`` that keeps every message in arrival order."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"capture-{port}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("#", qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, pred: Callable[[list[tuple[str, bytes, bool]]], bool],
                 timeout_s: float = 15.0) -> list[tuple[str, bytes, bool]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            snap = self.snapshot()
            if pred(snap):
                return snap
            time.sleep(0.02)
        raise AssertionError("timed out waiting for messages")

    def wait_count(self, n: int) -> list[tuple[str, bytes, bool]]:
        return self.wait_for(lambda s: len(s) >= n)

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def capture(broker: Mosquitto) -> Iterator[Capture]:
    c = Capture(broker.port)
    yield c
    c.close()


def run_on_broker(broker: Mosquitto, capture: Capture, fleet: Fleet,
                  options: SimOptions, **kw: Any) -> tuple[Truth, list[tuple[str, bytes, bool]]]:
    truth = sim.simulate(fleet, options, port=broker.port, **kw)
    assert truth.unacked == 0
    return truth, capture.wait_count(truth.messages)


# --------------------------------------------------------------------------- a strict reader


class GarbageError(ValueError):
    """Not a well-formed payload of the format."""


@dataclass
class Decoded:
    meter: str
    role: str  # data | power | energy | avail
    power_w: Decimal | None = None
    units: int | None = None  # counter in the format's units
    ts: float | None = None
    keys: frozenset[str] = frozenset()


def _no_constants(name: str) -> Any:
    raise GarbageError(f"JSON constant {name}")


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode(), parse_float=Decimal, parse_int=Decimal,
                          parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GarbageError(str(exc)) from None


def _num(value: Any) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise GarbageError(f"not a number: {value!r}")
    return value


def _text(payload: bytes, pattern: str) -> Decimal:
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise GarbageError("not UTF-8") from None
    if not re.fullmatch(pattern, text):
        raise GarbageError(f"{text!r} does not match {pattern}")
    return Decimal(text)


# published counter value -> counter units (UNITS_PER_KWH of them make a kWh)
WIRE_TO_UNITS = {"json": 1000, "tasmota": 1000, "shelly_gen1": 1, "shelly_gen2": 1000,
                 "zigbee2mqtt": 100, "esphome": 1000, "emonhub": 1, "mbmd": 1000}


def _units(value: Decimal, fmt: str) -> int:
    u = value * WIRE_TO_UNITS[fmt]
    if u != int(u):
        raise GarbageError(f"{value} has more digits than the device's resolution")
    return int(u)


def topic_map(fleet: Fleet) -> dict[str, tuple[sim.MeterSpec, str]]:
    """Every topic the fleet may publish on, with its meter and role (the SPEC's shapes)."""
    out: dict[str, tuple[sim.MeterSpec, str]] = {}
    for m in fleet.meters:
        n = m.name
        topics = {
            "json": {f"sim/{fleet.site}/json/{n}": "data"},
            "tasmota": {f"tele/{n}/SENSOR": "data", f"tele/{n}/LWT": "avail"},
            "shelly_gen1": {f"shellies/{n}/relay/0/power": "power",
                            f"shellies/{n}/relay/0/energy": "energy",
                            f"shellies/{n}/online": "avail"},
            "shelly_gen2": {f"{n}/events/rpc": "data"},
            "zigbee2mqtt": {f"zigbee2mqtt/{n}": "data",
                            f"zigbee2mqtt/{n}/availability": "avail"},
            "esphome": {f"{n}/sensor/power/state": "power",
                        f"{n}/sensor/energy/state": "energy", f"{n}/status": "avail"},
            "emonhub": {f"emon/{n}/P1": "power", f"emon/{n}/E1": "energy"},
            "mbmd": {f"mbmd/{n}/Power": "power", f"mbmd/{n}/Import": "energy"},
        }[m.format]
        for topic, role in topics.items():
            out[topic] = (m, role)
    return out


AVAILABILITY = {"tasmota": ("Online", "Offline"), "shelly_gen1": ("true", "false"),
                "zigbee2mqtt": ("online", "offline"), "esphome": ("online", "offline")}
TASMOTA_ENERGY_KEYS = {"TotalStartTime", "Total", "Yesterday", "Today", "Period", "Power",
                       "ApparentPower", "ReactivePower", "Factor", "Voltage", "Current"}
GEN2_KINDS = {
    frozenset({"id", "apower", "voltage", "current", "aenergy"}): "full",
    frozenset({"id", "apower"}): "power",
    frozenset({"id", "aenergy"}): "energy",
}


def decode(spec: sim.MeterSpec, role: str, payload: bytes) -> Decoded:
    """Strictly read one payload; raise :class:`GarbageError` if it is not well formed."""
    fmt = spec.format
    if role == "avail":
        if payload.decode(errors="replace") not in AVAILABILITY[fmt]:
            raise GarbageError("availability")
        return Decoded(spec.id, role)
    if fmt == "json":
        d = _json(payload)
        if not isinstance(d, dict) or set(d) != {"meter", "ts", "power_w", "energy_kwh",
                                                 "voltage_v", "current_a", "seq"}:
            raise GarbageError("json keys")
        if d["meter"] != spec.name or not isinstance(d["ts"], str):
            raise GarbageError("json meter/ts")
        for k in ("power_w", "energy_kwh", "voltage_v", "current_a", "seq"):
            _num(d[k])
        ts = dt.datetime.fromisoformat(d["ts"]).timestamp()
        return Decoded(spec.id, role, d["power_w"], _units(d["energy_kwh"], fmt), ts,
                       frozenset(d))
    if fmt == "tasmota":
        d = _json(payload)
        if not isinstance(d, dict) or set(d) != {"Time", "ENERGY"}:
            raise GarbageError("tasmota keys")
        e = d["ENERGY"]
        if not isinstance(e, dict) or set(e) != TASMOTA_ENERGY_KEYS:
            raise GarbageError("tasmota ENERGY keys")
        for k in TASMOTA_ENERGY_KEYS - {"TotalStartTime"}:
            _num(e[k])
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", d["Time"]):
            raise GarbageError("tasmota Time")  # local time, no offset
        ts = dt.datetime.fromisoformat(d["Time"]).replace(tzinfo=dt.UTC).timestamp()
        if e["Power"] != int(e["Power"]) or e["Total"].as_tuple().exponent != -3:
            raise GarbageError("tasmota resolution")
        return Decoded(spec.id, role, e["Power"], _units(e["Total"], fmt), ts, frozenset(e))
    if fmt == "shelly_gen2":
        d = _json(payload)
        if not isinstance(d, dict) or d.get("method") != "NotifyStatus" \
                or d.get("src") != spec.name or not isinstance(d.get("params"), dict):
            raise GarbageError("gen2 envelope")
        sw = d["params"].get("switch:0")
        if not isinstance(sw, dict) or frozenset(sw) not in GEN2_KINDS or sw["id"] != 0:
            raise GarbageError("gen2 switch:0")
        power = _num(sw["apower"]) if "apower" in sw else None
        units = None
        if "aenergy" in sw:
            ae = sw["aenergy"]
            if set(ae) != {"total", "by_minute", "minute_ts"}:
                raise GarbageError("gen2 aenergy")
            units = _units(_num(ae["total"]), fmt)
        return Decoded(spec.id, role, power, units, float(_num(d["params"]["ts"])),
                       frozenset(sw))
    if fmt == "zigbee2mqtt":
        d = _json(payload)
        if not isinstance(d, dict) or set(d) != {"current", "energy", "linkquality", "power",
                                                 "state", "voltage"}:
            raise GarbageError("z2m keys")
        for k in ("current", "energy", "linkquality", "power", "voltage"):
            _num(d[k])
        if d["state"] not in ("ON", "OFF") or d["energy"].as_tuple().exponent != -2:
            raise GarbageError("z2m state/energy")
        return Decoded(spec.id, role, d["power"], _units(d["energy"], fmt), None, frozenset(d))
    patterns = {  # (power, energy) text payloads at each device's resolution
        "shelly_gen1": (r"\d+\.\d\d", r"\d+"),
        "esphome": (r"\d+\.\d", r"\d+\.\d{3}"),
        "emonhub": (r"\d+", r"\d+"),
        "mbmd": (r"\d+\.\d{3}", r"\d+\.\d{3}"),
    }[fmt]
    if role == "power":
        return Decoded(spec.id, role, power_w=_text(payload, patterns[0]))
    return Decoded(spec.id, role, units=_units(_text(payload, patterns[1]), fmt))


@dataclass
class Replay:
    """What the captured messages say about one meter."""

    readings: int = 0
    dup_messages: int = 0
    garbage: int = 0
    counters: list[int] = field(default_factory=list)
    powers: list[tuple[float | None, Decimal]] = field(default_factory=list)  # (ts, W)
    samples: list[Decoded] = field(default_factory=list)
    availability: list[str] = field(default_factory=list)


def replay(fleet: Fleet, messages: list[tuple[str, bytes, bool]]) -> dict[str, Replay]:
    """Sort captured messages by meter: duplicates, garbage, readings, counters, power."""
    tmap = topic_map(fleet)
    out = {m.id: Replay() for m in fleet.meters}
    prev: tuple[str, bytes] | None = None
    gen2_power: dict[str, Decimal] = {}
    for topic, payload, _retain in messages:
        assert topic in tmap, f"unexpected topic {topic}"
        spec, role = tmap[topic]
        r = out[spec.id]
        if (topic, payload) == prev:  # a duplicate follows its original at once
            r.dup_messages += 1
            continue
        prev = (topic, payload)
        try:
            d = decode(spec, role, payload)
        except GarbageError:
            r.garbage += 1
            continue
        if role == "avail":
            r.availability.append(payload.decode())
            continue
        r.samples.append(d)
        if role in ("data", "energy"):
            r.readings += 1
        if d.units is not None:
            r.counters.append(d.units)
        if spec.format == "shelly_gen2":  # a delta without apower: power unchanged
            if d.power_w is not None:
                gen2_power[spec.id] = d.power_w
            r.powers.append((d.ts, gen2_power[spec.id]))
        elif d.power_w is not None:
            r.powers.append((d.ts, d.power_w))
    return out


def observable_units(counters: list[int]) -> tuple[int, int]:
    """(sum of increments with any drop read as a restart from 0, number of drops)."""
    total = drops = 0
    for a, b in itertools.pairwise(counters):
        if b < a:
            total += b
            drops += 1
        else:
            total += b - a
    return total, drops


def trapezoid_kwh(powers: list[tuple[float | None, Decimal]]) -> float:
    kwh = 0.0
    for (t0, p0), (t1, p1) in itertools.pairwise(powers):
        assert t0 is not None and t1 is not None
        kwh += float(p0 + p1) / 2 * (t1 - t0) / 3_600_000
    return kwh


# --------------------------------------------------------------------------- fleet & config


def test_fleet_spreads_meters_round_robin_and_is_deterministic() -> None:
    fleet = Fleet.build(20, ALL, seed=3, interval_s=10)
    assert [m.format for m in fleet.meters[:9]] == [*ALL, ALL[0]]
    assert Counter(m.format for m in fleet.meters) == {
        f: (3 if i < 4 else 2) for i, f in enumerate(ALL)}
    assert fleet == Fleet.build(20, ALL, seed=3, interval_s=10)
    assert fleet != Fleet.build(20, ALL, seed=4, interval_s=10)
    assert [m.id for m in fleet.meters[:2]] == ["rig-001", "rig-002"]
    assert all(2.925 <= m.rated_kw <= 3.575 for m in fleet.meters)  # 3.25 kW +-10 %
    assert all(m.phase_ms % 1000 == 0 and m.phase_ms < 10_000 for m in fleet.meters)
    assert {m.group for m in fleet.meters} == {"hall-a"}
    assert {m.group for m in Fleet.build(40, ALL, groups=3).meters} == {
        "hall-a", "hall-b", "hall-c"}
    devices = {m.format: m.devices for m in Fleet.build(8, ALL, prefix="r").meters}
    assert devices == {
        "json": ("r-001",),
        "tasmota": ("tasmota/r-002",),
        "shelly_gen1": ("shelly/shellyplug-s-r-003:0",),
        "shelly_gen2": ("shelly/shellyplus1pm-r-004:0",),
        "zigbee2mqtt": ("zigbee2mqtt/r-005",),
        "esphome": ("esphome/r-006",),
        "emonhub": ("emonhub/r-007:1",),
        "mbmd": ("mbmd/r-008",),
    }
    with pytest.raises(ValueError, match="prefix"):
        Fleet.build(2, ALL, prefix="Bad Prefix")
    assert sim.parse_formats("all") == ALL
    assert sim.parse_formats("tasmota, json,tasmota") == ("tasmota", "json")
    with pytest.raises(ValueError, match="unknown format"):
        sim.parse_formats("tasmota,modbus")


def test_config_snippet_is_a_valid_daemon_config_for_the_fleet() -> None:
    fleet = Fleet.build(16, ALL, site="irk-01", seed=1)
    snippet = sim.config_snippet(fleet)
    data = tomllib.loads(snippet)
    cfg = config_mod.parse({"site": {"id": "irk-01", "category": "individual"}, **data})
    by_device = cfg.meter_for_device()
    for spec in fleet.meters:
        for device in spec.devices:
            assert by_device[device].id == spec.id
        meter = by_device[spec.devices[0]]
        assert meter.group == spec.group
        assert meter.rated_kw == spec.rated_kw
        if spec.control is None:
            assert meter.control is None
            assert spec.format in ("json", "esphome", "emonhub", "mbmd")
        else:
            assert meter.control is not None
            assert (meter.control.kind, meter.control.topic) == (
                spec.control.kind, spec.control.topic)
    assert {(s.topic, s.format) for s in cfg.sources} == set(fleet.sources())
    assert "rated_kw" not in sim.config_snippet(fleet, rated_kw=False)
    # every topic the fleet publishes on is covered by exactly one source
    for topic in topic_map(fleet):
        assert sum(mqtt.topic_matches_sub(f, topic) for f, _ in fleet.sources()) == 1, topic


# --------------------------------------------------------------------------- wire format


def test_every_format_publishes_the_documented_topics_and_shapes(
        broker: Mosquitto, capture: Capture) -> None:
    fleet = Fleet.build(8, ALL, seed=5, interval_s=10)
    truth, msgs = run_on_broker(broker, capture, fleet,
                                SimOptions(duration_s=600, speed=0, start=START, seed=5))
    assert len(msgs) == truth.messages
    assert {t for t, _, _ in msgs} == set(topic_map(fleet))  # every topic, nothing else
    rep = replay(fleet, msgs)
    by_format = {m.format: m for m in fleet.meters}
    for fmt, spec in by_format.items():
        r = rep[spec.id]
        t = truth.meters[spec.id]
        assert r.garbage == 0 and r.dup_messages == 0
        assert r.readings == t.readings == (61 if spec.phase_ms == 0 else 60)  # 600 s / 10 s
        assert t.format == fmt
        assert t.device == (list(spec.devices) if len(spec.devices) > 1 else spec.devices[0])
        assert all(0 < p <= Decimal(str(spec.rated_kw)) * 1000 for _, p in r.powers)
        assert r.counters == sorted(r.counters)  # no faults asked: counters only rise
        if fmt in AVAILABILITY:
            assert r.availability == list(AVAILABILITY[fmt])  # online first, offline last
    # timestamps: native json and Gen2 carry simulated time, Tasmota its local clock
    for fmt in ("json", "shelly_gen2", "tasmota"):
        spec = by_format[fmt]
        ts = [s.ts or 0.0 for s in rep[spec.id].samples]
        assert ts[0] == START + spec.phase_ms / 1000
        assert all(b - a == 10 for a, b in itertools.pairwise(ts))
    # Gen2 sends the full status and both kinds of partial deltas
    gen2 = Counter(GEN2_KINDS[s.keys] for s in rep[by_format["shelly_gen2"].id].samples)
    assert gen2["full"] and gen2["power"] and gen2["energy"]
    first, *_, last = rep[by_format["shelly_gen2"].id].samples
    assert GEN2_KINDS[first.keys] == GEN2_KINDS[last.keys] == "full"
    # ESPHome states are retained (its default), the rest are not
    retained = {t for t, _, r in msgs if r}
    assert retained == set()  # a live subscriber gets retain=0 (MQTT 3.3.1.3)
    sink = MemorySink()
    Simulator(fleet, SimOptions(duration_s=20, speed=0, start=START), sink).run()
    assert {t for t, _, r in sink.messages if r and "/sensor/" in t} == {
        f"{by_format['esphome'].name}/sensor/power/state",
        f"{by_format['esphome'].name}/sensor/energy/state"}


def test_native_json_payload_matches_the_spec_example_shape() -> None:
    fleet = Fleet.build(1, ("json",), site="irk-01", seed=1)
    sink = MemorySink()
    Simulator(fleet, SimOptions(duration_s=30, speed=0, start=START), sink).run()
    topic, payload, retain = sink.messages[0]
    assert topic == "sim/irk-01/json/rig-001" and not retain
    doc = json.loads(payload)
    assert list(doc) == ["meter", "ts", "power_w", "energy_kwh", "voltage_v", "current_a", "seq"]
    assert doc["meter"] == "rig-001" and doc["seq"] == 1
    assert re.fullmatch(r"2025-11-27T02:00:0\dZ", doc["ts"])
    assert 2900 < doc["power_w"] < 3600 and doc["energy_kwh"] > 0


# --------------------------------------------------------------------------- ground truth


def test_ground_truth_recomputes_from_the_captured_messages(
        broker: Mosquitto, capture: Capture) -> None:
    fleet = Fleet.build(16, ALL, seed=11, interval_s=10)
    options = SimOptions(duration_s=1800, speed=0, start=START, seed=11, reboot_prob=0.03,
                         dup_prob=0.05, garbage_prob=0.05, gap_prob=0.05)
    truth, msgs = run_on_broker(broker, capture, fleet, options)
    rep = replay(fleet, msgs)
    assert truth.totals()["resets"] > 5 and truth.totals()["gaps"] > 5
    for spec in fleet.meters:
        t, r = truth.meters[spec.id], rep[spec.id]
        upk = UNITS_PER_KWH[spec.format]
        per_reading = 2 if spec.format in TWO_MESSAGE_FORMATS else 1
        assert r.readings == t.readings
        assert r.dup_messages == t.duplicates * per_reading
        assert r.garbage == t.garbage
        # counters rise except at the resets, and the observable energy is their sum
        units, drops = observable_units(r.counters)
        assert drops == t.resets
        assert t.observable_kwh == units / upk
        # rounding is one counter unit per reset cycle at most, never accumulated
        assert abs(t.observable_kwh - t.power_kwh) <= (t.resets + 1) * 1.0001 / upk
        # power is piecewise linear between published samples: trapezoid is exact
        if spec.format in ("json", "shelly_gen2", "tasmota"):
            assert trapezoid_kwh(r.powers) == pytest.approx(t.power_kwh, rel=1e-12)
        # the unobserved edges (before the first, after the last reading) are < 1 interval
        assert t.first_ts is not None and t.last_ts is not None
        edges_kwh = t.true_kwh - t.power_kwh
        assert 0 <= edges_kwh <= spec.rated_kw * 10 / 3600 * 1.0001
        assert t.first_ts == START + spec.phase_ms / 1000
        assert t.last_ts > START + 1800 - 10  # the last reading is never lost in a gap
    totals = truth.totals()
    assert totals["observable_kwh"] == pytest.approx(
        sum(m.observable_kwh for m in truth.meters.values()))
    assert totals["readings"] == sum(r.readings for r in rep.values())


def test_power_only_integration_equals_counter_energy_without_faults() -> None:
    fleet = Fleet.build(8, ALL, seed=2, interval_s=7.5)
    truth = Simulator(fleet, SimOptions(duration_s=3600, speed=0, start=START),
                      MemorySink()).run()
    for spec in fleet.meters:
        t = truth.meters[spec.id]
        # one reset cycle: observable and power energy differ by < 1 counter unit
        assert abs(t.observable_kwh - t.power_kwh) <= 1 / UNITS_PER_KWH[spec.format]
        assert t.readings == (481 if spec.phase_ms == 0 else 480) and t.resets == 0
    assert truth.end - truth.start == 3600


def test_faults_appear_at_the_requested_probabilities(
        broker: Mosquitto, capture: Capture) -> None:
    fleet = Fleet.build(24, ("json", "tasmota", "shelly_gen2"), seed=7, interval_s=10)
    p = 0.1
    options = SimOptions(duration_s=1200, speed=0, start=START, seed=7, reboot_prob=0.02,
                         dup_prob=p, garbage_prob=p, gap_prob=p)
    truth, msgs = run_on_broker(broker, capture, fleet, options)
    rep = replay(fleet, msgs)
    t = truth.totals()
    n = t["readings"]
    seen_dups = sum(r.dup_messages for r in rep.values())
    seen_garbage = sum(r.garbage for r in rep.values())
    assert seen_dups == t["duplicates"] and seen_garbage == t["garbage"]

    def near(count: int, trials: int, prob: float) -> bool:
        sigma = math.sqrt(trials * prob * (1 - prob))
        return abs(count - trials * prob) <= 4 * sigma

    assert near(seen_dups, n, p)
    assert near(seen_garbage, n, p)
    # a gap may start at any reading but a meter's first and last
    eligible = n - 2 * len(fleet.meters) + t["gaps"]
    assert near(t["gaps"], eligible, p)
    assert t["gaps"] <= t["skipped"] <= sim.MAX_GAP_READINGS * t["gaps"]
    assert 0 < t["resets"] <= 0.02 * n + 4 * math.sqrt(0.02 * n)
    # the same seed gives the same faults
    again = Simulator(fleet, options, MemorySink()).run().totals()
    assert {k: again[k] for k in ("duplicates", "garbage", "gaps", "resets")} == {
        k: t[k] for k in ("duplicates", "garbage", "gaps", "resets")}


def test_resets_restart_counters_from_zero_right_after_a_publish() -> None:
    fleet = Fleet.build(8, ALL, seed=4, interval_s=10)
    sink = MemorySink()
    truth = Simulator(fleet, SimOptions(duration_s=7200, speed=0, start=START, seed=4,
                                        reboot_prob=0.05), sink).run()
    rep = replay(fleet, sink.messages)
    for spec in fleet.meters:
        counters = rep[spec.id].counters
        drops = [(a, b) for a, b in itertools.pairwise(counters) if b < a]
        assert len(drops) == truth.meters[spec.id].resets > 0, spec.format
        upk = UNITS_PER_KWH[spec.format]
        for before, after in drops:
            # after a reset the counter holds only the energy since it (< a few
            # intervals), and the drop is far above the daemon's 0.002 kWh jitter
            assert after / upk < spec.rated_kw * 10 * (sim.MAX_GAP_READINGS + 1) / 3600
            assert (before - after) / upk > 0.01
    tasmota = next(m for m in fleet.meters if m.format == "tasmota")
    starts = {json.loads(p)["ENERGY"]["TotalStartTime"] for t, p, _ in sink.messages
              if t == f"tele/{tasmota.name}/SENSOR"}
    assert len(starts) == truth.meters[tasmota.id].resets + 1  # EnergyTotal 0 moves it


def test_truth_json_shape(tmp_path: Path) -> None:
    fleet = Fleet.build(3, ("json", "esphome", "mbmd"), seed=1)
    truth = Simulator(fleet, SimOptions(duration_s=100, speed=0, start=START), MemorySink()).run()
    path = tmp_path / "truth.json"
    sim.write_truth(truth, path)
    doc = json.loads(path.read_text())
    assert doc["start"] == "2025-11-27T02:00:00Z" and doc["end"] == "2025-11-27T02:01:40Z"
    assert set(doc["meters"]) == {"rig-001", "rig-002", "rig-003"}
    m = doc["meters"]["rig-002"]
    assert m["device"] == "esphome/rig-002"
    assert {"device", "format", "observable_kwh", "true_kwh", "readings"} <= set(m)
    assert doc["totals"]["observable_kwh"] == pytest.approx(
        sum(x["observable_kwh"] for x in doc["meters"].values()))
    assert doc["totals"]["readings"] == sum(x["readings"] for x in doc["meters"].values())
    assert "observable" in truth.summary()


# --------------------------------------------------------------------------- commands


def _sensor_power(fmt: str, payload: bytes) -> float:
    if fmt == "tasmota":
        return float(json.loads(payload)["ENERGY"]["Power"])
    if fmt == "shelly_gen1":
        return float(payload)
    if fmt == "shelly_gen2":
        return float(json.loads(payload)["params"]["switch:0"].get("apower", math.nan))
    if fmt == "zigbee2mqtt":
        return float(json.loads(payload)["power"])
    return float(json.loads(payload)["power_w"])


@contextlib.contextmanager
def running(broker: Mosquitto, fleet: Fleet, options: SimOptions) -> Iterator[list[Truth]]:
    """The simulator in a thread until the block ends; yields a list that gets the truth."""
    stop = threading.Event()
    out: list[Truth] = []
    thread = threading.Thread(
        target=lambda: out.append(sim.simulate(fleet, options, port=broker.port, stop=stop)))
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and out


CONTROLLED = ("tasmota", "shelly_gen1", "shelly_gen2", "zigbee2mqtt", "json")


def control_topic(spec: sim.MeterSpec) -> str:
    assert spec.control is not None
    return spec.control.topic


def _power_topic(spec: sim.MeterSpec, site: str) -> str:
    return {
        "tasmota": f"tele/{spec.name}/SENSOR",
        "shelly_gen1": f"shellies/{spec.name}/relay/0/power",
        "shelly_gen2": f"{spec.name}/events/rpc",
        "zigbee2mqtt": f"zigbee2mqtt/{spec.name}",
        "json": f"sim/{site}/json/{spec.name}",
    }[spec.format]


def _powers_after(snap: list[tuple[str, bytes, bool]], topic: str, fmt: str,
                  index: int) -> list[float]:
    vals = [_sensor_power(fmt, p) for t, p, _ in snap[index:] if t == topic]
    return [v for v in vals if not math.isnan(v)]


def test_commands_switch_loads_off_and_on(broker: Mosquitto, capture: Capture) -> None:
    fleet = Fleet.build(5, CONTROLLED, site="irk-01", seed=1, interval_s=1)
    specs = {m.format: m for m in fleet.meters}
    options = SimOptions(speed=20, start=START)  # a reading per meter every 50 ms
    off = {
        "tasmota": "OFF",
        "shelly_gen1": "off",
        "shelly_gen2": json.dumps({"id": 1, "src": "energy-monitor", "method": "Switch.Set",
                                   "params": {"id": 0, "on": False}}),
        "zigbee2mqtt": json.dumps({"state": "OFF"}),
    }
    on = {"tasmota": "ON", "shelly_gen1": "on",
          "shelly_gen2": off["shelly_gen2"].replace("false", "true"),
          "zigbee2mqtt": json.dumps({"state": "ON"})}
    with running(broker, fleet, options) as result:
        capture.wait_for(lambda s: all(any(t == _power_topic(m, "irk-01") for t, _, _ in s)
                                       for m in fleet.meters))
        mark = len(capture.snapshot())
        for fmt, payload in off.items():
            capture.publish(control_topic(specs[fmt]), payload)
        capture.publish(sim.orders_topic("irk-01"), json.dumps(
            {"order_id": "01J", "action": "shutdown", "scope": "meter:rig-005",
             "meters": [specs["json"].id], "rule": "r", "reason": "test",
             "issued_at": "2026-11-27T02:00:00Z"}))

        def all_off_for_three(s: list[tuple[str, bytes, bool]]) -> bool:
            for spec in fleet.meters:
                ps = _powers_after(s, _power_topic(spec, "irk-01"), spec.format, mark)
                if 0.0 not in ps or len(ps) - ps.index(0.0) < 4:
                    return False
            return True

        snap = capture.wait_for(all_off_for_three)
        for spec in fleet.meters:
            ps = _powers_after(snap, _power_topic(spec, "irk-01"), spec.format, mark)
            assert set(ps[ps.index(0.0):]) == {0.0}, spec.format  # stays off
        z2m_topic = f"zigbee2mqtt/{specs['zigbee2mqtt'].name}"
        z2m = [json.loads(p) for t, p, _ in snap[mark:] if t == z2m_topic]
        assert z2m[-1]["state"] == "OFF"
        energy_topic = f"shellies/{specs['shelly_gen1'].name}/relay/0/energy"
        wmin = [int(p) for t, p, _ in snap[mark:] if t == energy_topic]
        assert wmin[-1] == wmin[-2] == wmin[-3]  # the counter stops

        mark = len(snap)
        for fmt, payload in on.items():
            capture.publish(control_topic(specs[fmt]), payload)
        capture.publish(sim.orders_topic("irk-01"), json.dumps(
            {"action": "resume", "scope": "site", "meters": []}))
        capture.wait_for(lambda s: all(
            any(p > 0 for p in _powers_after(s, _power_topic(m, "irk-01"), m.format, mark))
            for m in fleet.meters))
    truth = result[0]
    actions = Counter(c["action"] for c in truth.commands)
    assert actions == {"off": 5, "on": 5}
    assert {m for c in truth.commands for m in c["meters"]} == {m.id for m in fleet.meters}
    assert truth.end > truth.start


def test_limit_order_switches_off_exactly_the_listed_meters() -> None:
    # docs/orders.md: a limit's `meters` are the meters to switch off; target_kw is
    # informative and no meter is throttled
    fleet = Fleet.build(3, ("json",), site="s", seed=1, interval_s=10)
    ids = [m.id for m in fleet.meters]
    sink = MemorySink()
    simulator = Simulator(fleet, SimOptions(duration_s=100, speed=0, start=START), sink)
    simulator.command(sim.orders_topic("s"), json.dumps(
        {"action": "limit", "scope": "site", "meters": ids[:2], "target_kw": 2.0}).encode())
    simulator.command(sim.orders_topic("s"), json.dumps(
        {"action": "limit", "scope": "site", "meters": [], "target_kw": 0.0}).encode())
    simulator.command("cmnd/nobody/POWER", b"OFF")  # unknown devices are ignored
    simulator.command(sim.orders_topic("s"), b"not json")  # and so are bad payloads
    truth = simulator.run()
    powers: dict[str, list[float]] = {}
    for _, p, _ in sink.messages:
        doc = json.loads(p)
        powers.setdefault(doc["meter"], []).append(doc["power_w"])
    assert set(powers[ids[0]]) == set(powers[ids[1]]) == {0.0}
    assert min(powers[ids[2]]) > 0.85 * fleet.meters[2].rated_kw * 1000 - 1
    assert [(c["topic"], c["action"], c["meters"]) for c in truth.commands] == [
        (sim.orders_topic("s"), "off", ids[:2])]


def test_resume_order_switches_listed_meters_back_on() -> None:
    fleet = Fleet.build(2, ("json",), site="s", seed=1, interval_s=10)
    ids = [m.id for m in fleet.meters]
    sink = MemorySink()
    simulator = Simulator(fleet, SimOptions(duration_s=30, speed=0, start=START), sink)
    simulator.command(sim.orders_topic("s"), json.dumps(
        {"action": "shutdown", "scope": "site", "meters": []}).encode())
    simulator.command(sim.orders_topic("s"), json.dumps(
        {"action": "resume", "scope": "site", "meters": [ids[1]]}).encode())
    truth = simulator.run()
    last = {json.loads(p)["meter"]: json.loads(p)["power_w"] for _, p, _ in sink.messages}
    assert last[ids[0]] == 0.0 and last[ids[1]] > 0
    assert [(c["action"], c["meters"]) for c in truth.commands] == [("off", ids),
                                                                    ("on", [ids[1]])]


def test_ignore_commands_keeps_loads_running(broker: Mosquitto, capture: Capture) -> None:
    fleet = Fleet.build(1, ("tasmota",), seed=1, interval_s=1)
    spec = fleet.meters[0]
    topic = f"tele/{spec.name}/SENSOR"
    with running(broker, fleet, SimOptions(speed=20, obey_commands=False)) as result:
        capture.wait_for(lambda s: any(t == topic for t, _, _ in s))
        mark = len(capture.snapshot())
        capture.publish(f"cmnd/{spec.name}/POWER", "OFF")
        snap = capture.wait_for(lambda s: len(_powers_after(s, topic, "tasmota", mark)) >= 6)
        assert min(_powers_after(snap, topic, "tasmota", mark)) > 0
    assert result[0].commands == []


# --------------------------------------------------------------------------- MQTT edges


def test_small_outstanding_window_still_delivers_everything(
        broker: Mosquitto, capture: Capture) -> None:
    fleet = Fleet.build(4, ("mbmd", "esphome"), seed=1)
    truth, msgs = run_on_broker(broker, capture, fleet,
                                SimOptions(duration_s=500, speed=0, start=START),
                                max_outstanding=3)
    readings = truth.totals()["readings"]
    assert readings >= 4 * 50
    assert len(msgs) == truth.messages == 2 * readings + 2 * 2  # + esphome online/offline


def test_unreachable_broker_is_a_simulator_error() -> None:
    with pytest.raises(sim.SimulatorError, match="cannot connect"):
        sim.simulate(Fleet.build(1), SimOptions(duration_s=1, speed=0), port=free_port())


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a duration"):
        SimOptions(speed=0).check()
    with pytest.raises(ValueError, match="dup_prob"):
        SimOptions(dup_prob=1.5).check()
    assert sim.default_start(SimOptions(speed=0, duration_s=60), now=1000.5) == 940.0
    assert sim.default_start(SimOptions(), now=1000.5) == 1000.0


def test_stop_ends_an_open_ended_run(broker: Mosquitto) -> None:
    fleet = Fleet.build(3, ("json",), seed=1, interval_s=1)
    with running(broker, fleet, SimOptions(speed=100)) as result:
        time.sleep(0.5)
    truth = result[0]
    assert truth.totals()["readings"] > 3
    assert truth.end - truth.start >= 40  # about 50 simulated seconds went by


# --------------------------------------------------------------------------- the CLI


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sim.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.run(_args("--meters", "4", "--formats", "tasmota,zigbee2mqtt",
                         "--site", "irk-01", "--meter-prefix", "s19", "--print-config")) == 0
    data = tomllib.loads(capsys.readouterr().out)
    assert [m["id"] for m in data["meters"]] == ["s19-001", "s19-002", "s19-003", "s19-004"]
    assert data["meters"][1]["control"] == {"kind": "zigbee2mqtt",
                                            "topic": "zigbee2mqtt/s19-002/set"}


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.run(_args("--speed", "0")) == sim.EX_USAGE
    assert "needs a duration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--formats", "modbus")
    with pytest.raises(SystemExit):
        _args("--gap-prob", "2")


def test_cli_run_writes_truth_and_config(broker: Mosquitto, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    truth_path, config_path = tmp_path / "truth.json", tmp_path / "fleet.toml"
    rc = sim.run(_args("--meters", "8", "--formats", "all", "--port", str(broker.port),
                       "--duration-s", "120", "--speed", "0", "--start", "2025-11-27T02:00:00Z",
                       "--dup-prob", "0.1", "--seed", "9", "--truth", str(truth_path),
                       "--config-out", str(config_path)))
    out = capsys.readouterr().out
    assert rc == 0
    assert "readings" in out and str(truth_path) in out
    doc = json.loads(truth_path.read_text())
    assert doc["start"] == "2025-11-27T02:00:00Z" and doc["totals"]["unacked"] == 0
    assert len(tomllib.loads(config_path.read_text())["meters"]) == 8


def test_cli_broker_down_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.run(_args("--port", str(free_port()), "--duration-s", "1")) == sim.EX_FAIL
    assert "cannot connect" in capsys.readouterr().err


# --------------------------------------------------------------------------- the parsers


def test_every_payload_parses_to_the_device_ids_and_garbage_is_a_parse_error(
        broker: Mosquitto, capture: Capture) -> None:
    parsers = pytest.importorskip("monitor.intake.parsers")
    fleet = Fleet.build(16, ALL, seed=21, interval_s=10)
    options = SimOptions(duration_s=1800, speed=0, start=START, seed=21, reboot_prob=0.02,
                         dup_prob=0.05, garbage_prob=0.2, gap_prob=0.05)
    truth, msgs = run_on_broker(broker, capture, fleet, options)
    tmap = topic_map(fleet)
    by_format = {fmt: parsers.make_parser(fmt) for fmt in fleet.formats}
    availability_device = {
        "tasmota": "tasmota/{}", "shelly_gen1": "shelly/{}", "zigbee2mqtt": "zigbee2mqtt/{}",
        "esphome": "esphome/{}",
    }
    energy: dict[str, list[float]] = defaultdict(list)
    reasons: Counter[str] = Counter()
    garbage = 0
    for topic, payload, retain in msgs:
        spec, role = tmap[topic]
        (fmt,) = {f for flt, f in fleet.sources() if mqtt.topic_matches_sub(flt, topic)}
        assert fmt == spec.format
        try:
            decode(spec, role, payload)
            is_garbage = False
        except GarbageError:
            is_garbage = True
        parser = by_format[fmt]
        if is_garbage:
            garbage += 1
            try:
                bad = parser.parse(topic, payload, 1e9, retain)
            except ParseError as err:
                reasons[err.reason] += 1
                continue
            # a Shelly Gen2 delta whose values are all bad still repeats the device's
            # kept status (unchanged values): the bad ones are skipped with a reason
            assert fmt == "shelly_gen2" and bad.skipped, (topic, payload, bad)
            reasons[bad.skipped[0]] += 1
            continue
        result = parser.parse(topic, payload, 1e9, retain)
        if role == "avail":
            assert [a.device for a in result.availability] == [
                availability_device[fmt].format(spec.name)]
            continue
        assert result.readings, (topic, payload)
        for reading in result.readings:
            assert reading.device in spec.devices, (reading.device, spec.devices)
            if reading.energy_kwh is not None:
                energy[spec.id].append(reading.energy_kwh)
    assert garbage == truth.totals()["garbage"] > 50
    assert {"not_utf8", "not_json", "nan", "wrong_type", "empty"} <= set(reasons)
    # the parsers' units turn the counters back into the observable energy
    for spec in fleet.meters:
        kwh = energy[spec.id]
        total = 0.0
        for a, b in itertools.pairwise(kwh):
            total += b if b < a else b - a
        assert total == pytest.approx(truth.meters[spec.id].observable_kwh, abs=1e-6)


def test_availability_payloads_parse_per_format() -> None:
    parsers = pytest.importorskip("monitor.intake.parsers")
    fleet = Fleet.build(8, ALL, seed=1)
    sink = MemorySink()
    Simulator(fleet, SimOptions(duration_s=0, speed=0, start=START), sink).run()
    tmap = topic_map(fleet)
    states = []
    for topic, payload, retain in sink.messages:
        spec, role = tmap[topic]
        if role != "avail":
            continue  # a meter whose phase is 0 reads once even in 0 s
        assert retain
        result = parsers.make_parser(spec.format).parse(topic, payload, 1e9, retain)
        states.append(result.availability[0].online)
    assert states == [True] * 4 + [False] * 4


def test_summary_mentions_every_fault_kind() -> None:
    fleet = Fleet.build(2, ("json",), seed=1)
    truth = Simulator(fleet, SimOptions(duration_s=50, speed=0, start=START,
                                        dup_prob=0.5), MemorySink()).run()
    text = truth.summary()
    for word in ("readings", "duplicated", "garbage", "gaps", "resets", "commands", "kWh"):
        assert word in text

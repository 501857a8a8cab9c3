"""A simulated fleet of electricity meters publishing over MQTT, with exact ground truth.

Library first, thin CLI last (``energy-monitor simulate``, see ``docs/simulate.md``):

* :meth:`Fleet.build` picks meter ids, device-native names, groups and ratings
  (deterministic for a seed), :func:`config_snippet` renders the matching
  ``[[sources]]`` and ``[[meters]]`` TOML for the daemon;
* :class:`Simulator` produces the readings of a fleet into any :class:`Sink`
  (a :class:`MemorySink` for tests, :class:`MqttSink` for a broker) and obeys
  device commands and orders fed to :meth:`Simulator.command`;
* :func:`simulate` wires a simulator to a broker and returns the :class:`Truth`.

The energy model, which makes the ground truth exact for what a daemon can see:

* every meter samples at ``start + phase + k * interval`` (simulated time);
* power is *piecewise linear between published samples*, each sample already at
  the device's own resolution, so trapezoid integration of the published power
  is exact; a gap (skipped readings) simply has no samples in it;
* the cumulative counter advances by exactly that same energy and is published
  rounded to the device's resolution (rounding never accumulates: the counter
  is cumulative, the error is at most one unit at the ends of each reset cycle);
* counter resets (``--reboot-prob``) happen right after a publish of the
  counter, so no energy is lost between the last publish and the reset.

Threads: :meth:`Simulator.run` runs in the caller's thread; the only other
thread is paho's network thread, which calls :meth:`Simulator.command` (a
deque append plus an event) and :class:`MqttSink`'s acknowledgement counter.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from monitor.config import FORMATS
from monitor.core.timefmt import rfc3339

__all__ = [
    "DEFAULT_RATED_KW", "EX_FAIL", "EX_OK", "EX_USAGE", "FORMATS", "MAX_GAP_READINGS",
    "Control", "Fleet", "MemorySink", "MeterSpec", "MeterTruth", "MqttSink", "SimOptions",
    "Simulator", "SimulatorError", "Sink", "Truth", "add_arguments", "config_snippet",
    "default_start", "fleet_from_args", "options_from_args", "orders_topic", "parse_formats",
    "parse_start", "run", "simulate", "write_truth",
]

log = logging.getLogger(__name__)

EX_OK, EX_FAIL, EX_USAGE = 0, 1, 2
MAX_GAP_READINGS = 3  # a gap skips 1..3 consecutive readings
DEFAULT_RATED_KW = 3.25  # an Antminer S19 at the wall
_ID_RE = re.compile(r"^[a-z0-9_-]+$")
_MS_PER_H = 3_600_000.0

# Per format: power resolution (decimals) and counter units per kWh, i.e. the
# device's own resolution: Tasmota/ESPHome/mbmd/json kWh with 3 decimals,
# Shelly Gen1 integer watt-minutes, Gen2 Wh with 3 decimals, emonhub integer
# Wh, Zigbee2MQTT kWh with 2 decimals (TS011F plugs).
_POWER_DECIMALS = {
    "json": 1, "tasmota": 0, "shelly_gen1": 2, "shelly_gen2": 1,
    "zigbee2mqtt": 0, "esphome": 1, "emonhub": 0, "mbmd": 1,
}
_UNITS_PER_KWH = {
    "json": 1000, "tasmota": 1000, "shelly_gen1": 60_000, "shelly_gen2": 1_000_000,
    "zigbee2mqtt": 100, "esphome": 1000, "emonhub": 1000, "mbmd": 1000,
}
# Lifetime counters start somewhere in a long past; Gen1's since-boot counter near 0.
_INITIAL_KWH = {"shelly_gen1": 2.0}
_DEFAULT_INITIAL_KWH = 20_000.0

# Gen2 NotifyStatus kinds: the full switch status, or a delta with one part.
_FULL, _POWER_ONLY, _ENERGY_ONLY = 0, 1, 2


class SimulatorError(Exception):
    """The simulation cannot run (broker unreachable, bad arguments); the message says why."""


# --------------------------------------------------------------------------- fleet


@dataclass(frozen=True, slots=True)
class Control:
    """How the daemon switches a meter's load: ``[[meters]].control`` in the config."""

    kind: str
    topic: str


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """One simulated meter: its config identity and its device-native name.

    ``name`` is what the device itself is called on MQTT (Tasmota topic, Shelly
    id, Zigbee friendly name, ESPHome node, emonhub node, mbmd device, or the
    ``meter`` field of native JSON); ``devices`` are the device ids the parsers
    derive from its topics.
    """

    id: str
    format: str
    name: str
    devices: tuple[str, ...]
    group: str
    rated_kw: float
    control: Control | None
    phase_ms: int
    initial_units: int  # the counter's first value, in the format's units


def _device_name(fmt: str, meter_id: str) -> str:
    if fmt == "shelly_gen1":
        return f"shellyplug-s-{meter_id}"
    if fmt == "shelly_gen2":
        return f"shellyplus1pm-{meter_id}"
    return meter_id


def _devices(fmt: str, name: str) -> tuple[str, ...]:
    return {
        "json": (name,),
        "tasmota": (f"tasmota/{name}",),
        "shelly_gen1": (f"shelly/{name}:0",),
        "shelly_gen2": (f"shelly/{name}:0",),
        "zigbee2mqtt": (f"zigbee2mqtt/{name}",),
        "esphome": (f"esphome/{name}",),
        "emonhub": (f"emonhub/{name}:1",),
        "mbmd": (f"mbmd/{name}",),
    }[fmt]


def _control(fmt: str, name: str) -> Control | None:
    topic = {
        "tasmota": f"cmnd/{name}/POWER",
        "shelly_gen1": f"shellies/{name}/relay/0/command",
        "shelly_gen2": f"{name}/rpc",
        "zigbee2mqtt": f"zigbee2mqtt/{name}/set",
    }.get(fmt)
    return Control(fmt, topic) if topic else None


def _group_name(g: int) -> str:
    return f"hall-{chr(ord('a') + g)}" if g < 26 else f"hall-{g + 1}"


def parse_formats(text: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list of format names; raises ``ValueError``."""
    if text.strip() == "all":
        return FORMATS
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(FORMATS)} or 'all'")
    return names


@dataclass(frozen=True, slots=True)
class Fleet:
    """The simulated meters of one site.  Same arguments and seed, same fleet."""

    site: str
    meters: tuple[MeterSpec, ...]
    interval_s: float
    seed: int

    @classmethod
    def build(
        cls,
        meters: int,
        formats: Sequence[str] = FORMATS,
        *,
        site: str = "sim",
        prefix: str = "rig",
        rated_kw: float = DEFAULT_RATED_KW,
        groups: int = 0,
        interval_s: float = 10.0,
        seed: int = 0,
    ) -> Fleet:
        """Spread ``meters`` round-robin over ``formats``.

        Each meter's rating is ``rated_kw`` ±10 % (uniform); ``groups`` of
        contiguous meters are named ``hall-a``, ``hall-b``... (0 = one group per
        20 meters).  Sampling phases are spread over the interval (whole seconds
        when the interval allows, like real devices' clocks).
        """
        if meters < 1:
            raise ValueError("meters must be at least 1")
        if not formats or any(f not in FORMATS for f in formats):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}")
        for what, value in (("site", site), ("prefix", prefix)):
            if not _ID_RE.match(value):
                raise ValueError(f"{what} must match [a-z0-9_-]+, got {value!r}")
        if rated_kw <= 0:
            raise ValueError("rated_kw must be positive")
        interval_ms = round(interval_s * 1000)
        if interval_ms < 1:
            raise ValueError("interval_s must be at least 0.001")
        n_groups = groups or max(1, math.ceil(meters / 20))
        n_groups = min(n_groups, meters)
        rng = random.Random(f"fleet:{seed}")
        width = max(3, len(str(meters)))
        specs = []
        for i in range(meters):
            fmt = formats[i % len(formats)]
            meter_id = f"{prefix}-{i + 1:0{width}d}"
            name = _device_name(fmt, meter_id)
            phase_ms = rng.randrange(interval_ms)
            if interval_ms >= 1000 and interval_ms % 1000 == 0:
                phase_ms -= phase_ms % 1000
            upk = _UNITS_PER_KWH[fmt]
            initial_kwh = rng.uniform(0.0, _INITIAL_KWH.get(fmt, _DEFAULT_INITIAL_KWH))
            specs.append(MeterSpec(
                id=meter_id,
                format=fmt,
                name=name,
                devices=_devices(fmt, name),
                group=_group_name(i * n_groups // meters),
                rated_kw=round(rated_kw * rng.uniform(0.9, 1.1), 3),
                control=_control(fmt, name),
                phase_ms=phase_ms,
                initial_units=round(initial_kwh * upk),
            ))
        return cls(site=site, meters=tuple(specs), interval_s=interval_ms / 1000, seed=seed)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.format for m in self.meters))

    def sources(self) -> list[tuple[str, str]]:
        """``(subscription filter, format)`` pairs covering everything the fleet publishes."""
        per_format = {
            "json": [f"sim/{self.site}/json/+"],
            "tasmota": ["tele/+/SENSOR", "tele/+/LWT"],
            "shelly_gen1": ["shellies/+/relay/0/power", "shellies/+/relay/0/energy",
                            "shellies/+/online"],
            "shelly_gen2": ["+/events/rpc"],
            "zigbee2mqtt": ["zigbee2mqtt/+", "zigbee2mqtt/+/availability"],
            "esphome": ["+/sensor/+/state", "+/status"],
            "emonhub": ["emon/+/P1", "emon/+/E1"],
            "mbmd": ["mbmd/+/Power", "mbmd/+/Import"],
        }
        return [(topic, fmt) for fmt in self.formats for topic in per_format[fmt]]

    def command_filters(self) -> list[str]:
        """Subscription filters for the device commands and the site's orders."""
        per_format = {
            "tasmota": "cmnd/+/POWER",
            "shelly_gen1": "shellies/+/relay/0/command",
            "shelly_gen2": "+/rpc",
            "zigbee2mqtt": "zigbee2mqtt/+/set",
        }
        filters = [per_format[f] for f in self.formats if f in per_format]
        return [*filters, orders_topic(self.site)]


def orders_topic(site: str) -> str:
    return f"energy-monitor/{site}/orders"


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string of plain ASCII is a valid TOML basic string


def config_snippet(fleet: Fleet, *, rated_kw: bool = True) -> str:
    """The ``[[sources]]`` and ``[[meters]]`` TOML that make the daemon read ``fleet``.

    Meters with a device command get a ``control``; the others (json, esphome,
    emonhub, mbmd) can only be switched through the orders topic.  With
    ``rated_kw=False`` the ratings are left out: the daemon's plausibility bound
    (``rated_kw`` x elapsed receipt time) would reject the counter increments of
    receipt-stamped formats in a time-compressed run.
    """
    out = [f"# simulated fleet: {len(fleet.meters)} meters of site {fleet.site!r}, "
           f"formats {', '.join(fleet.formats)} (energy-monitor simulate, seed {fleet.seed})", ""]
    for topic, fmt in fleet.sources():
        out += ["[[sources]]", f"topic = {_toml_str(topic)}", f"format = {_toml_str(fmt)}", ""]
    for m in fleet.meters:
        device = (_toml_str(m.devices[0]) if len(m.devices) == 1
                  else "[" + ", ".join(_toml_str(d) for d in m.devices) + "]")
        out += ["[[meters]]", f"id = {_toml_str(m.id)}", f"device = {device}",
                f"group = {_toml_str(m.group)}"]
        if rated_kw:
            out.append(f"rated_kw = {m.rated_kw}")
        if m.control is not None:
            out.append(f"control = {{ kind = {_toml_str(m.control.kind)}, "
                       f"topic = {_toml_str(m.control.topic)} }}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- options, truth


@dataclass(frozen=True, slots=True)
class SimOptions:
    """How the fleet behaves over a run.  Probabilities are per reading (see docs/simulate.md)."""

    duration_s: float | None = None  # simulated; None = until stopped
    speed: float = 1.0  # simulated seconds per real second; 0 = as fast as possible
    start: float | None = None  # simulated start, Unix seconds; None: see default_start()
    reboot_prob: float = 0.0
    dup_prob: float = 0.0
    garbage_prob: float = 0.0
    gap_prob: float = 0.0
    seed: int = 0
    obey_commands: bool = True
    availability: bool = True  # online at start, offline at the end (retained)

    def check(self) -> None:
        for name in ("reboot_prob", "dup_prob", "garbage_prob", "gap_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.speed < 0 or not math.isfinite(self.speed):
            raise ValueError("speed must be >= 0")
        if self.duration_s is not None and not self.duration_s >= 0:
            raise ValueError("duration_s must be >= 0")
        if self.speed == 0 and self.duration_s is None:
            raise ValueError("speed 0 (as fast as possible) needs a duration")


@dataclass(slots=True)
class MeterTruth:
    """What one meter did.  Energies in kWh; see docs/simulate.md for the definitions."""

    id: str
    device: str | list[str]
    format: str
    group: str
    rated_kw: float
    observable_kwh: float  # sum of published counter increments, first to last reading
    power_kwh: float  # exact trapezoid of the published power, first to last reading
    true_kwh: float  # everything the load drew from start to end
    readings: int
    messages: int
    duplicates: int
    garbage: int
    gaps: int
    skipped: int
    resets: int
    first_ts: float | None
    last_ts: float | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "id"}


@dataclass(slots=True)
class Truth:
    """The ground truth of a run: per meter, totals, and the commands obeyed."""

    site: str
    start: float
    end: float
    interval_s: float
    seed: int
    meters: dict[str, MeterTruth]
    commands: list[dict[str, Any]] = field(default_factory=list)
    messages: int = 0  # every publish, including availability, duplicates and garbage
    unacked: int = 0  # publishes the broker had not acknowledged when the run ended

    def totals(self) -> dict[str, Any]:
        ms = self.meters.values()
        return {
            "meters": len(self.meters),
            "observable_kwh": sum(m.observable_kwh for m in ms),
            "power_kwh": sum(m.power_kwh for m in ms),
            "true_kwh": sum(m.true_kwh for m in ms),
            **{k: sum(getattr(m, k) for m in ms)
               for k in ("readings", "duplicates", "garbage", "gaps", "skipped", "resets")},
            "messages": self.messages,
            "commands": len(self.commands),
            "unacked": self.unacked,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "start": rfc3339(self.start),
            "end": rfc3339(self.end),
            "start_ts": self.start,
            "end_ts": self.end,
            "interval_s": self.interval_s,
            "seed": self.seed,
            "meters": {k: m.as_dict() for k, m in self.meters.items()},
            "totals": self.totals(),
            "commands": self.commands,
        }

    def summary(self) -> str:
        t = self.totals()
        return (
            f"simulated {t['meters']} meters of site {self.site} from {rfc3339(self.start)} "
            f"to {rfc3339(self.end)}: {t['readings']} readings in {t['messages']} messages "
            f"({t['duplicates']} duplicated, {t['garbage']} garbage, {t['gaps']} gaps "
            f"skipping {t['skipped']} readings, {t['resets']} counter resets, "
            f"{t['commands']} commands obeyed, {t['unacked']} unacknowledged)\n"
            f"energy: observable {t['observable_kwh']:.3f} kWh (counters), "
            f"{t['power_kwh']:.3f} kWh (power), true {t['true_kwh']:.3f} kWh"
        )


def default_start(options: SimOptions, now: float | None = None) -> float:
    """Now (whole second); for ``speed 0`` now minus the duration, so that the
    device timestamps of an as-fast-as-possible run end now instead of lying
    hours in the future."""
    now_s = float(int(time.time() if now is None else now))
    if options.speed == 0 and options.duration_s is not None:
        return now_s - math.ceil(options.duration_s)
    return now_s


# --------------------------------------------------------------------------- sinks


class Sink(Protocol):
    """Where a simulator's messages go.  Called from the simulator's thread only."""

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None: ...


@dataclass
class MemorySink:
    """Keeps every message in order: for tests and generation-only benchmarks."""

    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.messages.append((topic, data, retain))


class MqttSink:
    """Publishes QoS 1 over MQTT 5 (paho 2.x) and bounds the unacknowledged messages.

    Flow control, in two layers:

    * paho's in-flight limit never exceeds the broker's Receive Maximum
      (mosquitto's default is 20): :meth:`connect` reads it from the CONNACK
      and, if paho's setting is higher, reconnects once with it lowered (paho
      cannot change it on an open connection);
    * ``publish`` blocks while ``max_outstanding`` messages (queued in paho or
      in flight) wait for their PUBACK, so memory stays bounded and paho's
      16-bit message ids never wrap onto a message still unacknowledged.

    Acknowledgements are counted in ``on_publish`` (paho's network thread);
    messages published while disconnected stay queued in paho and are sent on
    reconnect.  ``command_filters`` are (re)subscribed on every connect, and
    each message on them is handed to ``on_command`` from the network thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        max_outstanding: int = 5000,
        max_inflight: int = 0,
        ack_timeout_s: float = 60.0,
        command_filters: Sequence[str] = (),
        on_command: Callable[[str, bytes], None] | None = None,
    ) -> None:
        if not 1 <= max_outstanding <= 20_000:
            raise ValueError("max_outstanding must be between 1 and 20000")
        if max_inflight < 0:
            raise ValueError("max_inflight must be >= 0 (0 = as many as the broker allows)")
        self.host, self.port, self.keepalive_s = host, port, keepalive_s
        self.max_outstanding = max_outstanding
        self.ack_timeout_s = ack_timeout_s
        self.max_inflight = max_inflight
        self.on_command = on_command
        self.sent = 0
        self.acked = 0
        self.failed = 0  # PUBACKs with a failure reason code (e.g. not authorised)
        self.receive_maximum = 65535  # the MQTT 5 default when the CONNACK names none
        self._filters = list(command_filters)
        self._client_id = client_id or (
            f"energy-monitor-sim-{os.getpid()}-{random.getrandbits(32):08x}")
        self._credentials = (username, password)
        self._waiting = False
        self._ack_event = threading.Event()
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._client = self._new_client(max_inflight)

    def _new_client(self, inflight: int) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             protocol=MQTTProtocolVersion.MQTTv5)
        if self._credentials[0] is not None:
            client.username_pw_set(*self._credentials)
        # 0 = no paho limit: paho then skips a scan of all its queued messages
        # on every PUBACK; our own window (max_outstanding) bounds the queue
        client.max_inflight_messages_set(inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    # -- paho callbacks (network thread): bookkeeping only
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Properties | None) -> None:
        if rc.is_failure:
            self._connect_error = f"broker refused the connection: {rc}"
            self._connected.set()
            return
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self.receive_maximum = receive_max if isinstance(receive_max, int) and receive_max > 0 \
            else 65535
        for topic in self._filters:
            client.subscribe(topic, qos=1)
        self._connect_error = None
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                       props: Properties | None) -> None:
        self._connected.clear()
        if rc.is_failure:
            log.warning("simulator disconnected from %s:%d: %s", self.host, self.port, rc)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode,
                    props: Properties | None) -> None:
        self.acked += 1
        if rc.is_failure:
            self.failed += 1
        if self._waiting:
            self._ack_event.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        handler = self.on_command
        if handler is not None:
            handler(msg.topic, bytes(msg.payload))

    # -- caller's thread
    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; raises :class:`SimulatorError`.

        Call before the first ``publish``.
        """
        self._start(timeout_s)
        paho_limit = self.max_inflight or 65535
        allowed = min(paho_limit, self.receive_maximum)
        if allowed < paho_limit:
            log.info("broker allows %d messages in flight; reconnecting with that limit",
                     allowed)
            self.close()
            self._client = self._new_client(allowed)
            self._start(timeout_s)

    def _start(self, timeout_s: float) -> None:
        self._connected.clear()
        self._connect_error = None
        try:
            self._client.connect(self.host, self.port, self.keepalive_s, clean_start=True)
        except OSError as exc:
            raise SimulatorError(f"cannot connect to MQTT broker {self.host}:{self.port}: "
                                 f"{exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise SimulatorError(f"no CONNACK from {self.host}:{self.port} within {timeout_s}s")
        if self._connect_error:
            self.close()
            raise SimulatorError(self._connect_error)

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        self._client.publish(topic, payload, 1, retain)
        self.sent += 1
        if self.sent - self.acked >= self.max_outstanding:
            self.wait_below(self.max_outstanding // 2, self.ack_timeout_s)

    def wait_below(self, outstanding: int, timeout_s: float) -> bool:
        """Wait until at most ``outstanding`` publishes lack a PUBACK; False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._waiting = True
        try:
            while self.sent - self.acked > outstanding:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ack_event.clear()
                if self.sent - self.acked <= outstanding:
                    break
                self._ack_event.wait(min(left, 0.5))
        finally:
            self._waiting = False
        return True

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every PUBACK; returns how many are still missing."""
        self.wait_below(0, timeout_s)
        return self.sent - self.acked

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttSink:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- per-meter state


class _Iso:
    """``YYYY-MM-DDTHH:MM:SS[.mmm]`` from integer ms, caching the date part."""

    __slots__ = ("_date", "_day")

    def __init__(self) -> None:
        self._day = -1
        self._date = ""

    def __call__(self, t_ms: int) -> str:
        day, rem = divmod(t_ms, 86_400_000)
        if day != self._day:
            self._day = day
            self._date = time.strftime("%Y-%m-%dT", time.gmtime(day * 86400))
        s, ms = divmod(rem, 1000)
        h, s = divmod(s, 3600)
        mi, s = divmod(s, 60)
        out = f"{self._date}{h:02d}:{mi:02d}:{s:02d}"
        return f"{out}.{ms:03d}" if ms else out


def _fixed(units: int, decimals: int) -> str:
    """An integer count of 10**-decimals as an exact decimal string."""
    if decimals == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    q, r = divmod(abs(units), 10**decimals)
    return f"{sign}{q}.{r:0{decimals}d}"


class _Meter:
    """Runtime state of one meter; only the simulator's thread touches it."""

    __slots__ = (
        "counter_kwh", "day", "dec", "duplicates", "first_ms",
        "first_p_w", "fmt", "gap_left", "gaps", "garbage", "last_pub_units",
        "messages", "obs_units", "off", "p_units", "p_w", "pdiv", "power_kwh", "pub_units",
        "rated_w", "readings", "reset_min_units", "reset_pending", "resets", "seq", "skipped",
        "spec", "state_changed", "t_ms", "today_kwh", "topics", "total_start", "upk", "v_base",
        "yesterday_kwh",
    )

    def __init__(self, spec: MeterSpec, interval_ms: int) -> None:
        self.spec = spec
        self.fmt = spec.format
        self.dec = _POWER_DECIMALS[self.fmt]
        self.pdiv = 10**self.dec
        self.upk = _UNITS_PER_KWH[self.fmt]
        self.rated_w = round(spec.rated_kw * 1000.0, 6)
        self.v_base = 2300 + zlib.crc32(spec.id.encode()) % 61 - 30  # decivolts, per meter
        self.counter_kwh = spec.initial_units / self.upk
        self.pub_units = spec.initial_units
        self.last_pub_units: int | None = None
        self.obs_units = 0
        self.reset_pending = False
        # a reset must be visible as a drop: the counter before it must exceed
        # three times what can accrue until the next counter publish
        max_span_kwh = self.rated_w * interval_ms * (MAX_GAP_READINGS + 1) / _MS_PER_H / 1000.0
        self.reset_min_units = math.ceil(max(0.05, 3 * max_span_kwh) * self.upk)
        self.t_ms = 0
        self.first_ms: int | None = None
        self.p_w = 0.0
        self.first_p_w = 0.0
        self.p_units = 0
        self.power_kwh = 0.0
        self.readings = self.messages = self.duplicates = self.garbage = 0
        self.gaps = self.skipped = self.resets = self.seq = 0
        self.gap_left = 0
        self.off = False
        self.state_changed = False
        self.day = -1
        self.today_kwh = 0.0
        self.yesterday_kwh = 0.0
        self.total_start = ""
        self.topics = _topics(spec)


def _topics(spec: MeterSpec) -> dict[str, str]:
    n = spec.name
    return {
        "json": {"data": f"sim/{{site}}/json/{n}"},
        "tasmota": {"data": f"tele/{n}/SENSOR", "avail": f"tele/{n}/LWT"},
        "shelly_gen1": {"power": f"shellies/{n}/relay/0/power",
                        "energy": f"shellies/{n}/relay/0/energy",
                        "avail": f"shellies/{n}/online"},
        "shelly_gen2": {"data": f"{n}/events/rpc"},
        "zigbee2mqtt": {"data": f"zigbee2mqtt/{n}", "avail": f"zigbee2mqtt/{n}/availability"},
        "esphome": {"power": f"{n}/sensor/power/state", "energy": f"{n}/sensor/energy/state",
                    "avail": f"{n}/status"},
        "emonhub": {"power": f"emon/{n}/P1", "energy": f"emon/{n}/E1"},
        "mbmd": {"power": f"mbmd/{n}/Power", "energy": f"mbmd/{n}/Import"},
    }[spec.format]


_AVAILABILITY = {  # format: (online, offline)
    "tasmota": ("Online", "Offline"),
    "shelly_gen1": ("true", "false"),
    "zigbee2mqtt": ("online", "offline"),
    "esphome": ("online", "offline"),
}


# --------------------------------------------------------------------------- garbage


def _garbage(fmt: str, valid: str, rng: random.Random) -> bytes:
    """A malformed payload for ``fmt`` that no parser can take for a reading."""
    common: list[bytes] = [
        b"\xff\xfe\x00\x81garbage\x00\xc3",  # not UTF-8
        b"hello world",
    ]
    if fmt != "zigbee2mqtt":  # Zigbee2MQTT clears a removed device's state with b""
        common.append(b"")
    if valid.startswith("{"):
        nan = re.sub(r'(?<=":)-?[0-9.]+', "NaN", valid)  # every number becomes NaN
        wrong = re.sub(r'(?<=":)-?[0-9.]+', '"n/a"', valid)  # every number a string
        kinds = [*common, valid[: len(valid) // 2].encode(), b'"just a string"']
        if fmt != "shelly_gen2":  # a Gen2 delta with bad values repeats the kept status
            kinds += [nan.encode(), wrong.encode()]
        if fmt in ("json", "shelly_gen2"):  # elsewhere {} is a harmless non-meter message
            kinds.append(b"{}")
    else:
        kinds = [*common, b"nan", b"12.3.4", b'{"value": 1}', b"0x1F", b"--"]
    return rng.choice(kinds)


# --------------------------------------------------------------------------- simulator


class Simulator:
    """Runs a :class:`Fleet` into a :class:`Sink` and keeps the ground truth.

    :meth:`run` is called once, from one thread.  :meth:`command` may be called
    from any thread (paho's network thread): it only queues the message, which
    :meth:`run` applies before the next reading.
    """

    def __init__(self, fleet: Fleet, options: SimOptions, sink: Sink) -> None:
        options.check()
        self.fleet = fleet
        self.options = options
        self.sink = sink
        self.interval_ms = round(fleet.interval_s * 1000)
        self._rng = random.Random(f"run:{options.seed}")
        self._meters = [_Meter(s, self.interval_ms) for s in fleet.meters]
        for m in self._meters:
            if "data" in m.topics:
                m.topics["data"] = m.topics["data"].replace("{site}", fleet.site)
        self._by_id = {m.spec.id: m for m in self._meters}
        self._by_command_topic = {
            m.spec.control.topic: m for m in self._meters if m.spec.control is not None
        }
        self._orders_topic = orders_topic(fleet.site)
        self._inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake = threading.Event()
        self._iso = _Iso()
        self.commands: list[dict[str, Any]] = []
        self.extra_messages = 0  # availability
        self.now_ms = 0
        self._encoders = {
            "json": self._enc_json, "tasmota": self._enc_tasmota,
            "shelly_gen1": self._enc_gen1, "shelly_gen2": self._enc_gen2,
            "zigbee2mqtt": self._enc_z2m, "esphome": self._enc_esphome,
            "emonhub": self._enc_emonhub, "mbmd": self._enc_mbmd,
        }

    # ---------------------------------------------------------------- commands

    def command(self, topic: str, payload: bytes) -> None:
        """Queue a device command or an order (thread-safe, cheap)."""
        if self.options.obey_commands:
            self._inbox.append((topic, bytes(payload)))
            self._wake.set()

    def wake(self) -> None:
        """Interrupt a paced wait (used by :meth:`stop` callers)."""
        self._wake.set()

    def _drain(self) -> None:
        while self._inbox:
            topic, payload = self._inbox.popleft()
            try:
                self._apply(topic, payload)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.info("simulator ignores command on %s: %s", topic, exc)

    def _apply(self, topic: str, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace").strip()
        if topic == self._orders_topic:
            # docs/orders.md: `meters` lists exactly the meters to switch (a limit's
            # meters are the ones chosen to be shed; its target_kw is informative)
            order = json.loads(text)
            action = order["action"]
            if action not in ("shutdown", "limit", "resume"):
                raise ValueError(f"unknown order action {action!r}")
            meters = order.get("meters") or []
            if not meters and action != "limit":  # a site whose meters the daemon does not know
                meters = self._scope(str(order.get("scope", "")))
            targets = [self._by_id[i] for i in meters if i in self._by_id]
            self._switch(targets, on=action == "resume", via=topic)
            return
        meter = self._by_command_topic.get(topic)
        if meter is None:
            return
        on: bool | None
        if meter.fmt == "tasmota":
            on = {"OFF": False, "0": False, "ON": True, "1": True}.get(text.upper())
            if text.upper() == "TOGGLE":
                on = meter.off
        elif meter.fmt == "shelly_gen1":
            on = {"off": False, "on": True}.get(text.lower())
            if text.lower() == "toggle":
                on = meter.off
        elif meter.fmt == "shelly_gen2":
            rpc = json.loads(text)
            params = rpc.get("params") or {}
            if int(params.get("id", 0)) != 0:
                return
            if rpc.get("method") == "Switch.Set":
                on = bool(params["on"])
            elif rpc.get("method") == "Switch.Toggle":
                on = meter.off
            else:
                return
        else:  # zigbee2mqtt
            state = str(json.loads(text)["state"]).upper()
            on = {"OFF": False, "ON": True}.get(state)
            if state == "TOGGLE":
                on = meter.off
        if on is None:
            raise ValueError(f"unknown command payload {text[:40]!r}")
        self._switch([meter], on=on, via=topic)

    def _scope(self, scope: str) -> list[str]:
        kind, _, name = scope.partition(":")
        if kind == "site":
            return list(self._by_id)
        if kind == "group":
            return [m.spec.id for m in self._meters if m.spec.group == name]
        if kind == "meter":
            return [name]
        return []

    def _switch(self, targets: list[_Meter], *, on: bool, via: str) -> None:
        for m in targets:
            m.off = not on
            m.state_changed = True
        self._log_command(targets, "on" if on else "off", via)

    def _log_command(self, targets: list[_Meter], action: str, via: str) -> None:
        if targets:
            self.commands.append({"at": self.now_ms / 1000, "topic": via, "action": action,
                                  "meters": [m.spec.id for m in targets]})

    # ---------------------------------------------------------------- the loop

    def run(self, stop: threading.Event | None = None) -> Truth:
        """Publish until the duration ends or ``stop`` is set; return the truth."""
        opts = self.options
        stop = stop or threading.Event()
        start_s = opts.start if opts.start is not None else default_start(opts)
        start_ms = round(start_s * 1000)
        end_ms = None if opts.duration_s is None else start_ms + round(opts.duration_s * 1000)
        interval_ms = self.interval_ms
        speed = opts.speed
        order = sorted(self._meters, key=lambda m: (m.spec.phase_ms, m.spec.id))
        self.now_ms = start_ms
        if opts.availability:
            self._publish_availability(online=True)
        real0 = time.monotonic()
        last_ms = start_ms
        k = 0
        stopped = interrupted = False
        while not stopped:
            base = start_ms + k * interval_ms
            for m in order:
                t_ms = base + m.spec.phase_ms
                if end_ms is not None and t_ms > end_ms:
                    stopped = True
                    break
                if speed > 0:
                    due = real0 + (t_ms - start_ms) / 1000.0 / speed
                    while True:
                        delay = due - time.monotonic()
                        if delay <= 0 or stop.is_set():
                            break
                        self._wake.wait(min(delay, 0.2))  # re-check `stop` often
                        self._wake.clear()
                        if self._inbox:
                            self.now_ms = round(
                                start_ms + (time.monotonic() - real0) * 1000.0 * speed)
                            self._drain()
                if stop.is_set():
                    stopped = interrupted = True
                    break
                self.now_ms = t_ms
                if self._inbox:
                    self._drain()
                self._reading(m, t_ms, end_ms is not None and t_ms + interval_ms > end_ms)
                last_ms = t_ms
            k += 1
        if interrupted or end_ms is None:
            # stopped from outside: the run ends now, in simulated time
            now_ms = round(start_ms + (time.monotonic() - real0) * 1000.0 * speed)
            stop_ms = max(last_ms, now_ms) if speed > 0 else last_ms
            end_ms = stop_ms if end_ms is None else min(end_ms, stop_ms)
        if opts.availability:
            self.now_ms = end_ms
            self._publish_availability(online=False)
        return self._truth(start_ms, end_ms)

    def _publish_availability(self, *, online: bool) -> None:
        for m in self._meters:
            pair = _AVAILABILITY.get(m.fmt)
            if pair is not None:
                self.sink.publish(m.topics["avail"], pair[0] if online else pair[1], True)
                self.extra_messages += 1

    def _truth(self, start_ms: int, end_ms: int) -> Truth:
        meters = {}
        for m in self._meters:
            true_kwh = m.power_kwh
            if m.first_ms is not None:
                true_kwh += m.first_p_w * (m.first_ms - start_ms) / _MS_PER_H / 1000.0
                true_kwh += m.p_w * max(0, end_ms - m.t_ms) / _MS_PER_H / 1000.0
            spec = m.spec
            meters[spec.id] = MeterTruth(
                id=spec.id,
                device=spec.devices[0] if len(spec.devices) == 1 else list(spec.devices),
                format=m.fmt, group=spec.group, rated_kw=spec.rated_kw,
                observable_kwh=m.obs_units / m.upk, power_kwh=m.power_kwh, true_kwh=true_kwh,
                readings=m.readings, messages=m.messages, duplicates=m.duplicates,
                garbage=m.garbage, gaps=m.gaps, skipped=m.skipped, resets=m.resets,
                first_ts=None if m.first_ms is None else m.first_ms / 1000,
                last_ts=None if m.first_ms is None else m.t_ms / 1000,
            )
        total_messages = self.extra_messages + sum(m.messages for m in self._meters)
        return Truth(site=self.fleet.site, start=start_ms / 1000, end=end_ms / 1000,
                     interval_s=self.fleet.interval_s, seed=self.options.seed, meters=meters,
                     commands=list(self.commands), messages=total_messages)

    def _reading(self, m: _Meter, t_ms: int, final: bool) -> None:
        """One sample of one meter: maybe skipped (gap), else published with its faults."""
        rng = self._rng
        opts = self.options
        if m.readings and not final:
            if m.gap_left:
                m.gap_left -= 1
                m.skipped += 1
                return
            if opts.gap_prob and rng.random() < opts.gap_prob:
                m.gaps += 1
                m.skipped += 1
                m.gap_left = rng.randint(1, MAX_GAP_READINGS) - 1
                return
        m.gap_left = 0

        kind = _FULL
        if m.fmt == "shelly_gen2" and m.readings and not final and not m.state_changed \
                and not m.reset_pending:
            r = rng.random()
            kind = _FULL if r < 0.4 else _POWER_ONLY if r < 0.7 else _ENERGY_ONLY
        m.state_changed = False

        # power at this sample, already at the device's resolution
        if kind == _ENERGY_ONLY:
            p_units = m.p_units  # a delta without apower means "unchanged"
        elif m.off:
            p_units = 0
        else:
            f = 0.96 + rng.gauss(0.0, 0.012)
            p_w = m.rated_w * (0.85 if f < 0.85 else 1.0 if f > 1.0 else f)
            p_units = round(p_w * m.pdiv)
        p = p_units / m.pdiv
        if m.first_ms is None:
            m.first_ms = t_ms
            m.first_p_w = p
            inc_kwh = 0.0
        else:
            inc_kwh = (m.p_w + p) * (t_ms - m.t_ms) / (2.0 * _MS_PER_H * 1000.0)
            m.counter_kwh += inc_kwh
            m.power_kwh += inc_kwh
        m.t_ms, m.p_w, m.p_units = t_ms, p, p_units
        m.pub_units = round(m.counter_kwh * m.upk)

        counter_published = kind != _POWER_ONLY
        if counter_published:
            u = m.pub_units
            if m.last_pub_units is not None:
                m.obs_units += u if m.reset_pending else u - m.last_pub_units
            m.last_pub_units = u
            m.reset_pending = False

        msgs = self._encoders[m.fmt](m, t_ms, inc_kwh, kind)
        publish = self.sink.publish
        retain = m.fmt == "esphome"  # ESPHome retains states by default
        dup = bool(opts.dup_prob) and rng.random() < opts.dup_prob
        for topic, payload in msgs:
            publish(topic, payload, retain)
            if dup:
                publish(topic, payload, retain)
        m.messages += 2 * len(msgs) if dup else len(msgs)
        m.duplicates += dup
        m.readings += 1
        if opts.garbage_prob and rng.random() < opts.garbage_prob:
            topic, valid = msgs[rng.randrange(len(msgs))]
            publish(topic, _garbage(m.fmt, valid, rng), False)
            m.garbage += 1
            m.messages += 1

        # a reboot (since-boot counters) or a manual reset (lifetime counters)
        # happens right after a publish of the counter: no energy goes unseen
        if opts.reboot_prob and counter_published and not final \
                and rng.random() < opts.reboot_prob and m.pub_units >= m.reset_min_units:
            m.counter_kwh = 0.0
            m.pub_units = 0
            m.reset_pending = True
            m.resets += 1
            m.total_start = self._iso(t_ms)[:19]  # Tasmota's TotalStartTime after `EnergyTotal 0`

    # ---------------------------------------------------------------- encoders

    def _electrics(self, m: _Meter) -> tuple[str, str]:
        """Voltage (1 decimal) and current (3 decimals) consistent with the power."""
        v10 = m.v_base + self._rng.randint(-15, 15)
        cur = m.p_w / (v10 / 10 * 0.99)
        return _fixed(v10, 1), f"{cur:.3f}"

    def _enc_json(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        m.seq += 1
        v, a = self._electrics(m)
        return [(m.topics["data"],
                 f'{{"meter":"{m.spec.name}","ts":"{self._iso(t_ms)}Z",'
                 f'"power_w":{_fixed(m.p_units, m.dec)},'
                 f'"energy_kwh":{_fixed(m.pub_units, 3)},"voltage_v":{v},"current_a":{a},'
                 f'"seq":{m.seq}}}')]

    def _enc_tasmota(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        day = t_ms // 86_400_000
        if day != m.day:
            if m.day >= 0:
                m.yesterday_kwh, m.today_kwh = m.today_kwh, 0.0
            m.day = day
        m.today_kwh += inc
        if not m.total_start:  # the counter started long before the simulation
            m.total_start = self._iso(t_ms - 400 * 86_400_000)[:19]
        v10 = m.v_base + self._rng.randint(-15, 15)
        pw = m.p_units
        if pw:
            va = round(pw / 0.99)
            var = round(math.sqrt(max(0, va * va - pw * pw)))
            cur = f"{va / (v10 / 10):.3f}"
            factor = "0.99"
        else:
            va = var = 0
            cur, factor = "0.000", "0.00"
        return [(m.topics["data"],
                 f'{{"Time":"{self._iso(t_ms)[:19]}","ENERGY":{{'
                 f'"TotalStartTime":"{m.total_start}","Total":{_fixed(m.pub_units, 3)},'
                 f'"Yesterday":{m.yesterday_kwh:.3f},"Today":{m.today_kwh:.3f},'
                 f'"Period":{round(inc * 1000)},"Power":{pw},"ApparentPower":{va},'
                 f'"ReactivePower":{var},"Factor":{factor},"Voltage":{round(v10 / 10)},'
                 f'"Current":{cur}}}}}')]

    def _enc_gen1(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        return [(m.topics["power"], _fixed(m.p_units, 2)),
                (m.topics["energy"], str(m.pub_units))]

    def _enc_gen2(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        name = m.spec.name
        parts = []
        if kind != _ENERGY_ONLY:
            v, a = self._electrics(m)
            parts.append(f'"apower":{_fixed(m.p_units, 1)}')
            if kind == _FULL:
                parts.append(f'"voltage":{v},"current":{a}')
        if kind != _POWER_ONLY:
            by_minute = f"{m.p_w * 1000 / 60:.3f}"
            parts.append(f'"aenergy":{{"total":{_fixed(m.pub_units, 3)},'
                         f'"by_minute":[{by_minute},{by_minute},{by_minute}],'
                         f'"minute_ts":{t_ms // 60_000 * 60}}}')
        return [(m.topics["data"],
                 f'{{"src":"{name}","dst":"{name}/events","method":"NotifyStatus",'
                 f'"params":{{"ts":{_fixed(t_ms, 3) if t_ms % 10 else _fixed(t_ms // 10, 2)},'
                 f'"switch:0":{{"id":0,{",".join(parts)}}}}}}}')]

    def _enc_z2m(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        v10 = m.v_base + self._rng.randint(-15, 15)
        cur = m.p_w / (v10 / 10 * 0.99)
        return [(m.topics["data"],
                 f'{{"current":{cur:.2f},"energy":{_fixed(m.pub_units, 2)},'
                 f'"linkquality":{self._rng.randint(40, 120)},"power":{m.p_units},'
                 f'"state":"{"OFF" if m.off else "ON"}","voltage":{round(v10 / 10)}}}')]

    def _enc_esphome(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        return [(m.topics["power"], _fixed(m.p_units, 1)),
                (m.topics["energy"], _fixed(m.pub_units, 3))]

    def _enc_emonhub(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        return [(m.topics["power"], str(m.p_units)), (m.topics["energy"], str(m.pub_units))]

    def _enc_mbmd(self, m: _Meter, t_ms: int, inc: float, kind: int) -> list[tuple[str, str]]:
        return [(m.topics["power"], f"{m.p_units / 10:.3f}"),
                (m.topics["energy"], f"{m.pub_units / 1000:.3f}")]


# --------------------------------------------------------------------------- top level


def simulate(
    fleet: Fleet,
    options: SimOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 1883,
    username: str | None = None,
    password: str | None = None,
    client_id: str = "",
    max_outstanding: int = 5000,
    stop: threading.Event | None = None,
    flush_timeout_s: float = 60.0,
) -> Truth:
    """Run ``fleet`` against a broker until done or ``stop``; wait for PUBACKs; return the truth.

    Raises :class:`SimulatorError` when the broker cannot be reached.
    """
    sink = MqttSink(host, port, client_id=client_id, username=username, password=password,
                    max_outstanding=max_outstanding,
                    command_filters=fleet.command_filters() if options.obey_commands else ())
    sim = Simulator(fleet, options, sink)
    sink.on_command = sim.command
    sink.connect()
    try:
        truth = sim.run(stop)
        truth.unacked = sink.flush(flush_timeout_s)
    finally:
        sink.close()
    return truth


def write_truth(truth: Truth, path: Path) -> None:
    """Write the truth JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(truth.as_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- CLI


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a number >= 0")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a number > 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _formats(text: str) -> tuple[str, ...]:
    try:
        return parse_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _identifier(text: str) -> str:
    if not _ID_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} must match [a-z0-9_-]+")
    return text


def parse_start(text: str) -> float:
    """``now``, Unix seconds, or RFC 3339 (no offset = UTC) to Unix seconds."""
    if text == "now":
        return float(int(time.time()))
    try:
        return float(text)
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'now', Unix seconds or an RFC 3339 time") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d.timestamp()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``energy-monitor simulate`` (documented in docs/simulate.md)."""
    g = p.add_argument_group("fleet")
    g.add_argument("--meters", type=_positive_int, default=8, help="number of meters (default 8)")
    g.add_argument("--formats", type=_formats, default=FORMATS, metavar="LIST",
                   help="comma-separated device formats, or 'all' (default); meters are "
                        "spread round-robin over them")
    g.add_argument("--site", type=_identifier, default="sim",
                   help="site id, used in json topics and the orders topic (default sim)")
    g.add_argument("--meter-prefix", type=_identifier, default="rig",
                   help="meter ids are PREFIX-001, PREFIX-002... (default rig)")
    g.add_argument("--rated-kw", type=_positive, default=DEFAULT_RATED_KW,
                   help=f"nominal draw per meter, randomised ±10%% per meter "
                        f"(default {DEFAULT_RATED_KW}, an S19)")
    g.add_argument("--groups", type=int, default=0,
                   help="number of groups hall-a, hall-b... (default: one per 20 meters)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    t = p.add_argument_group("time")
    t.add_argument("--interval-s", type=_positive, default=10.0,
                   help="simulated seconds between readings of a meter (default 10)")
    t.add_argument("--duration-s", type=_non_negative, default=None,
                   help="simulated seconds to run (default: until SIGINT/SIGTERM)")
    t.add_argument("--speed", type=_non_negative, default=1.0,
                   help="simulated seconds per real second; 0 = as fast as the broker "
                        "takes (needs --duration-s) (default 1)")
    t.add_argument("--start", type=parse_start, default=None,
                   help="simulated start: 'now', Unix seconds or RFC 3339 (default: now; "
                        "with --speed 0, now minus the duration)")

    f = p.add_argument_group("faults")
    f.add_argument("--reboot-prob", type=_probability, default=0.0,
                   help="per reading: the counter restarts from 0 right after it")
    f.add_argument("--dup-prob", type=_probability, default=0.0,
                   help="per reading: its messages are published twice")
    f.add_argument("--garbage-prob", type=_probability, default=0.0,
                   help="per reading: one malformed payload follows on one of its topics")
    f.add_argument("--gap-prob", type=_probability, default=0.0,
                   help=f"per reading: a gap starts, skipping 1..{MAX_GAP_READINGS} readings")

    m = p.add_argument_group("MQTT and output")
    m.add_argument("--host", default="127.0.0.1", help="MQTT broker (default 127.0.0.1)")
    m.add_argument("--port", type=int, default=1883, help="MQTT port (default 1883)")
    m.add_argument("--username", default=None, help="MQTT user name")
    m.add_argument("--password-file", type=Path, default=None,
                   help="file holding the MQTT password")
    m.add_argument("--client-id", default="", help="MQTT client id (default: random)")
    m.add_argument("--max-outstanding", type=int, default=5000,
                   help="publishes awaiting PUBACK before publishing blocks (1..20000)")
    obey = m.add_mutually_exclusive_group()
    obey.add_argument("--obey-commands", dest="obey_commands", action="store_true",
                      default=True,
                      help="switch meters on device commands and orders (default)")
    obey.add_argument("--ignore-commands", dest="obey_commands", action="store_false",
                      help="do not subscribe to commands: loads keep running")
    m.add_argument("--no-availability", dest="availability", action="store_false",
                   help="do not publish retained online/offline availability")
    m.add_argument("--truth", type=Path, default=None, metavar="FILE",
                   help="write the JSON ground truth to FILE at the end")
    m.add_argument("--config-out", type=Path, default=None, metavar="FILE",
                   help="write the daemon's [[sources]]/[[meters]] TOML for this fleet to FILE")
    m.add_argument("--print-config", action="store_true",
                   help="print that TOML to stdout and exit without publishing")
    m.add_argument("--config-no-rated-kw", dest="config_rated_kw", action="store_false",
                   help="leave rated_kw out of that TOML (for time-compressed runs of "
                        "receipt-stamped formats, see docs/simulate.md)")


def fleet_from_args(args: argparse.Namespace) -> Fleet:
    return Fleet.build(
        args.meters, args.formats, site=args.site, prefix=args.meter_prefix,
        rated_kw=args.rated_kw, groups=args.groups, interval_s=args.interval_s, seed=args.seed,
    )


def options_from_args(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        duration_s=args.duration_s, speed=args.speed, start=args.start,
        reboot_prob=args.reboot_prob, dup_prob=args.dup_prob,
        garbage_prob=args.garbage_prob, gap_prob=args.gap_prob, seed=args.seed,
        obey_commands=args.obey_commands, availability=args.availability,
    )


def run(args: argparse.Namespace) -> int:
    """``energy-monitor simulate``: 0 done, 1 broker failure, 2 bad arguments."""
    try:
        fleet = fleet_from_args(args)
        options = options_from_args(args)
        options.check()
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EX_USAGE
    if args.print_config:
        sys.stdout.write(config_snippet(fleet, rated_kw=args.config_rated_kw))
        return EX_OK
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"simulate: cannot read --password-file: {exc}", file=sys.stderr)
            return EX_USAGE
    if args.config_out is not None:
        args.config_out.write_text(config_snippet(fleet, rated_kw=args.config_rated_kw),
                                   encoding="utf-8")

    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        truth = simulate(fleet, options, host=args.host, port=args.port,
                         username=args.username, password=password, client_id=args.client_id,
                         max_outstanding=args.max_outstanding, stop=stop)
    except SimulatorError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EX_FAIL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.truth is not None:
        write_truth(truth, args.truth)
    print(truth.summary())
    if args.truth is not None:
        print(f"ground truth written to {args.truth}")
    return EX_OK if truth.unacked == 0 else EX_FAIL

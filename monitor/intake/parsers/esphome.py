"""ESPHome MQTT: ``<node>/sensor/<name>/state`` bare numbers, ``<node>/status`` availability.

One node is one meter, ``esphome/<node>`` (the node part may contain slashes: a
custom ``topic_prefix``); a sensor whose name carries a channel marker
(``phase_a``, ``l2``, ``ct3``, ``channel_1``) belongs to the channel meter
``esphome/<node>:<channel>`` (``a``, ``l2``, ``ct3``, ``1``).  Channel meters are
read only while the node has no device-level value of that quantity: the
phase powers of an SDM meter next to its ``total_power`` would count twice,
so they are skipped (``phase_value``); a node with several independent CT
clamps and no total gives one meter per clamp.

What a sensor measures is decided, first to last, by:

1. the source's options ``energy_sensors`` / ``export_sensors`` /
   ``power_sensors`` / ``ignore_sensors`` (comma-separated sensor names as in
   the topic);
2. the node's Home Assistant discovery config (``device_class``,
   ``unit_of_measurement``), when ``discovery_prefix`` is read (the daemon
   subscribes to it for every esphome source);
3. the name, when it is unambiguous.

Only imported active energy is consumption.  Export energy (``export``,
``returned``, ``produced``, ``feed`` in the name) is stored as
``export_kwh``.  Skipped with their reasons: daily, yesterday, weekly ...
totals (``daily_total``), reactive and apparent power and energy, power
factor and other quantities (``not_energy_value``), a power of the export
direction only (``export_power``), and every second sensor of one quantity
(``duplicate_counter``, ``duplicate_power``): an Athom plug publishes
``energy`` (since boot), ``total_energy`` (kept across reboots) and
``total_daily_energy``; only ``total_energy`` is read.  Among counters a name
with ``total`` ranks first, ``import`` next; among power sensors ``total``
first.  A better-ranked sensor that appears later takes over (the switch is
judged by the counter rules: an implausible jump is a new baseline, not
energy).

A sensor that none of the three decides is the dead letter ``no_measurement``
naming the options to set, so a meter that is not counted shows up.  Units:
the declaration's, else the options ``power_unit`` (``W`` | ``kW``, default W)
and ``energy_unit`` (``Wh`` | ``kWh``, default kWh).  ``nan``/``None`` (a
sensor without a value) is the ParseError ``nan``; a negative power is
production, a negative counter the dead letter ``negative``.  Readings are
stamped on receipt; ESPHome sends no time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from monitor.core.model import ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers.common import (
    check_options,
    ignored,
    names_option,
    online,
    text_measurement,
    text_power,
)
from monitor.intake.parsers.discovery import Declaration, DiscoveryRegistry

_OPTIONS = ("power_unit", "energy_unit", "energy_sensors", "export_sensors", "power_sensors",
            "ignore_sensors")
_POWER_UNITS = {"w": 1.0, "kw": 1000.0}  # -> W (lower case: options are case-insensitive)
_ENERGY_UNITS = {"wh": 0.001, "kwh": 1.0}  # -> kWh
_DECLARED_UNITS = {"MW": ("power", 1_000_000.0), "MWh": ("energy", 1000.0)}  # case matters
_OTHER_QUANTITIES = frozenset({
    "voltage", "volt", "volts", "current", "amps", "ampere", "amperage", "temperature", "temp",
    "humidity", "frequency", "freq", "uptime", "wifi", "signal", "rssi", "battery", "pressure",
    "illuminance", "lux", "factor", "pf", "angle", "cosphi", "thd", "count", "speed", "rpm",
    "level", "version", "ip", "ssid", "status",
})
_PERIOD = frozenset({"daily", "today", "yesterday", "day", "week", "weekly", "month",
                     "monthly", "year", "yearly", "hour", "hourly"})
_EXPORT = frozenset({"export", "exported", "returned", "return", "produced", "production",
                     "feed", "feedin", "injected", "injection", "generated", "generation"})
_ENERGY = frozenset({"energy", "kwh", "wh", "consumption", "consumed", "import", "imported",
                     "meter", "counter"})
_POWER = frozenset({"power", "watt", "watts", "wattage", "load"})
_CHANNEL_TOKEN = re.compile(r"^(l[1-9]|ct\d{1,2}|ch\d{1,2}|phase[a-c1-9]|channel\d{1,2})$")
_CHANNEL_WORD = {"phase": re.compile(r"^([a-c]|[1-9])$"), "channel": re.compile(r"^\d{1,2}$"),
                 "ct": re.compile(r"^\d{1,2}$"), "ch": re.compile(r"^\d{1,2}$"),
                 "clamp": re.compile(r"^\d{1,2}$")}


@dataclass(frozen=True, slots=True)
class _Role:
    """What one sensor is: ``quantity`` power | import | export, on ``channel``, in ``scale``."""

    quantity: str
    channel: str
    rank: int
    scale: float


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]


def _channel(tokens: list[str]) -> str:
    """The channel a sensor name carries ('' for the device), e.g. ``phase_a_power`` -> a."""
    for i, tok in enumerate(tokens):
        if _CHANNEL_TOKEN.match(tok):
            for word in ("phase", "channel"):
                if tok.startswith(word):
                    return tok[len(word):]
            return tok
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        pattern = _CHANNEL_WORD.get(tok)
        if pattern is not None and pattern.match(nxt):
            return nxt if tok in ("phase", "channel") else tok + nxt
    return ""


def _by_name(tokens: list[str]) -> str | None:
    """power | import | export | a skip reason, from the name alone; None if unsure."""
    words = set(tokens)
    joined = "_".join(tokens)
    energy = bool(words & _ENERGY) or "kwh" in joined or "energy" in joined
    power = bool(words & _POWER) or "power" in joined
    if "reactive" in words or "kvar" in words or "kvarh" in words or "var" in words:
        return "reactive_energy" if energy else "reactive_power"
    if "apparent" in words or "va" in words or "kvah" in words:
        return "apparent_energy" if energy else "apparent_power"
    if words & {"factor", "pf", "angle", "cosphi"}:
        return "not_energy_value"
    if energy:
        if words & _PERIOD:
            return "daily_total"
        return "export" if words & _EXPORT else "import"
    if power:
        if "demand" in words and "max" in words:
            return "not_energy_value"
        return "export_power" if words & _EXPORT else "power"
    if words & _OTHER_QUANTITIES:
        return "not_energy_value"
    return None


def _by_declaration(decl: Declaration, tokens: list[str]) -> tuple[str | None, float | None]:
    """(power | import | export | reason | None, scale) from a discovery declaration."""
    raw = decl.unit.strip().replace(" ", "")
    cls = decl.device_class
    big = _DECLARED_UNITS.get(raw)
    if big is not None and cls in ("", big[0]):
        named = _by_name([*tokens, big[0]])
        return (named if named in ("power", "import", "export", "export_power", "daily_total")
                else "not_energy_value"), big[1]
    unit = raw.lower()
    if cls == "power" or (not cls and unit in _POWER_UNITS):
        scale = _POWER_UNITS.get(unit)
        if scale is None and unit:
            return "not_energy_value", None
        named = _by_name(tokens)
        return ("export_power" if named == "export_power" else "power"), scale
    if cls == "energy" or (not cls and unit in _ENERGY_UNITS):
        scale = _ENERGY_UNITS.get(unit)
        if scale is None and unit:
            return "not_energy_value", None
        named = _by_name([*tokens, "energy"])
        if named in ("daily_total", "export", "reactive_energy", "apparent_energy"):
            return named, scale
        return "import", scale
    if cls in ("reactive_power", "apparent_power") or unit in ("var", "kvar", "va", "kva"):
        return ("apparent_power" if "va" in unit or cls == "apparent_power"
                else "reactive_power"), None
    if unit in ("varh", "kvarh", "vah", "kvah"):
        return ("apparent_energy" if "va" in unit else "reactive_energy"), None
    if cls or unit:
        return "not_energy_value", None
    return None, None


def _rank(quantity: str, tokens: list[str]) -> int:
    words = set(tokens)
    if quantity == "import":
        return 3 if "total" in words else 2 if words & {"import", "imported"} else 1
    return 2 if "total" in words else 1


class EsphomeParser:
    """Parser for ``format = "esphome"``.  Keeps sensor roles and each meter's best sensors."""

    def __init__(
        self, options: Mapping[str, object] | None = None,
        registry: DiscoveryRegistry | None = None, topic_filter: str | None = None,
    ) -> None:
        opts = check_options("esphome", options, _OPTIONS)
        self._power_scale = _unit(opts, "power_unit", "W", _POWER_UNITS)
        self._energy_scale = _unit(opts, "energy_unit", "kWh", _ENERGY_UNITS)
        lists = {key: names_option("esphome", opts, key) for key in
                 ("energy_sensors", "export_sensors", "power_sensors", "ignore_sensors")}
        seen: set[str] = set()
        for names in lists.values():
            twice = seen & names
            if twice:
                raise ValueError(f"format 'esphome': sensor {sorted(twice)[0]!r} is in two lists")
            seen |= names
        self._lists = lists
        self._registry = registry
        self._roles: dict[tuple[str, str], _Role | str] = {}
        self._best: dict[tuple[str, str, str], tuple[int, str]] = {}  # (node, channel, q)
        self._device_level: set[tuple[str, str]] = set()  # (node, quantity) read at device level

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        head, sep, last = topic.rpartition("/")
        if not sep or not head:
            raise ParseError("unknown_topic", f"{topic!r} is not an ESPHome topic")
        if last == "status":
            return online(payload, "esphome/" + head)
        if last == "debug":
            return ignored("not_energy_topic")
        rest, sep2, name = head.rpartition("/")
        node, sep3, component = rest.rpartition("/")
        if not (sep2 and sep3 and node and name):
            raise ParseError("unknown_topic", f"{topic!r} is not an ESPHome topic")
        if component != "sensor" or last != "state":
            if last == "command" or last.endswith("_command"):
                return ignored("command")
            if last == "state" or last.endswith("_state"):
                return ignored("state_without_energy")  # switches, binary/text sensors, ...
            raise ParseError("unknown_topic", f"{topic!r} is not an ESPHome topic")
        role = self._roles.get((node, name))
        if role is None:
            role = self._classify(node, name, topic)
        if isinstance(role, str):
            return ignored(role)
        key = (node, role.channel, role.quantity)
        best = self._best.get(key)
        if best is not None and best[1] != name and best[0] >= role.rank:
            return ignored("duplicate_power" if role.quantity == "power"
                           else "duplicate_counter")
        if role.channel and (node, role.quantity) in self._device_level:
            return ignored("phase_value")
        device = f"esphome/{node}"
        if role.quantity == "power":
            watts = round(text_power(payload, device + "/" + name) * role.scale, 6)
            reading = Reading(device + (f":{role.channel}" if role.channel else ""),
                              received_at, TsSource.RECEIVED, watts)
        else:
            kwh = round(text_measurement(payload, device + "/" + name) * role.scale, 9)
            reading = Reading(
                device + (f":{role.channel}" if role.channel else ""), received_at,
                TsSource.RECEIVED, None, kwh if role.quantity == "import" else None,
                export_kwh=kwh if role.quantity == "export" else None,
            )
        self._best[key] = (role.rank, name)
        if not role.channel:
            self._device_level.add((node, role.quantity))
        return ParseResult(readings=(reading,))

    def _classify(self, node: str, name: str, topic: str) -> _Role | str:
        tokens = _tokens(name)
        scale: float | None = None
        what: str | None
        if name in self._lists["ignore_sensors"]:
            what = "not_energy_value"
        elif name in self._lists["power_sensors"]:
            what = "power"
        elif name in self._lists["energy_sensors"]:
            what = "import"
        elif name in self._lists["export_sensors"]:
            what = "export"
        else:
            decl = self._registry.lookup(topic) if self._registry is not None else None
            what, scale = _by_declaration(decl, tokens) if decl is not None else (None, None)
            if what is None:
                what = _by_name(tokens)
        if what is None:
            raise ParseError(
                "no_measurement",
                f"sensor {name!r} is neither power nor energy by its name and no discovery "
                "config declares it; list it in the source's power_sensors, energy_sensors, "
                "export_sensors or ignore_sensors option",
            )
        role: _Role | str
        if what in ("power", "import", "export"):
            if scale is None:
                scale = self._power_scale if what == "power" else self._energy_scale
            role = _Role(what, _channel(tokens), _rank(what, tokens), scale)
        else:
            role = what
        if len(self._roles) < 65536:
            self._roles[(node, name)] = role
        return role


def _unit(opts: Mapping[str, object], key: str, default: str, table: Mapping[str, float]) -> float:
    raw = opts.get(key, default)
    scale = table.get(raw.strip().lower()) if isinstance(raw, str) else None
    if scale is None:
        names = " or ".join(("W", "kW") if "w" in table else ("Wh", "kWh"))
        raise ValueError(f"format 'esphome': option {key!r} must be {names}, got {raw!r}")
    return scale

"""ESPHome MQTT: ``<node>/sensor/<name>/state`` bare numbers, ``<node>/status`` availability.

The unit is not on the wire (only in the node's YAML), so it comes from the
source's options, and what a sensor measures comes from its name:

* ``energy_sensors`` / ``power_sensors`` / ``ignore_sensors`` (comma-separated
  sensor names as in the topic) decide first;
* a name containing ``yesterday`` is ignored (a finished day, not a counter);
* ``energy`` or ``kwh`` -> energy (``daily``/``today`` in the name ->
  :attr:`EnergyScope.DAILY`, resets at the node's midnight; else lifetime);
* ``factor``, ``reactive`` or ``apparent`` -> ignored (not active power);
* ``power`` or ``watt`` -> power;
* a name that suggests another quantity (voltage, current, temperature, ...)
  -> ignored; anything else is a ``no_measurement`` ParseError, so a meter
  that is silently not counted shows up in the dead letters.

Options ``power_unit`` (``W`` | ``kW``, default W) and ``energy_unit`` (``Wh`` |
``kWh``, default kWh) convert to W and kWh.  ``nan`` and ``None`` (sent for
a sensor without a value) are ParseErrors ``nan``.  Readings are stamped on
receipt; ESPHome sends no time.  The node part may contain slashes (a custom
``topic_prefix``).
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.model import EnergyScope, ParseError, ParseResult, Reading, TsSource
from monitor.parsers.common import (
    IGNORED,
    check_options,
    kwh_from_wh,
    names_option,
    online,
    text_measurement,
    w_from_kw,
)

_POWER_UNITS = {"w": False, "kw": True}  # value: needs kW -> W
_ENERGY_UNITS = {"wh": True, "kwh": False}  # value: needs Wh -> kWh
_OTHER_QUANTITIES = (
    "voltage", "volt", "current", "amps", "ampere", "temperature", "temp", "humidity", "frequency",
    "freq", "uptime", "wifi", "signal", "rssi", "battery", "pressure", "illuminance", "lux",
    "factor", "reactive", "apparent",
)
_OPTIONS = ("power_unit", "energy_unit", "energy_sensors", "power_sensors", "ignore_sensors")

# What a sensor name maps to: None = ignored, else (is_energy, scope).
_Kind = tuple[bool, EnergyScope] | None
_POWER: _Kind = (False, EnergyScope.LIFETIME)


class EsphomeParser:
    """Parser for ``format = "esphome"``.  Caches each sensor name's classification."""

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        opts = check_options("esphome", options, _OPTIONS)
        self._power_in_kw = _unit(opts, "power_unit", "W", _POWER_UNITS)
        self._energy_in_wh = _unit(opts, "energy_unit", "kWh", _ENERGY_UNITS)
        self._energy_names = names_option("esphome", opts, "energy_sensors")
        self._power_names = names_option("esphome", opts, "power_sensors")
        self._ignore_names = names_option("esphome", opts, "ignore_sensors")
        both = (self._energy_names & self._power_names) | (
            (self._energy_names | self._power_names) & self._ignore_names
        )
        if both:
            raise ValueError(f"format 'esphome': sensor {sorted(both)[0]!r} is in two lists")
        self._kinds: dict[str, _Kind] = {}

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        head, sep, last = topic.rpartition("/")
        if not sep or not head:
            raise ParseError("unknown_topic", f"{topic!r} is not an ESPHome topic")
        if last == "status":
            return online(payload, "esphome/" + head)
        if last == "debug":
            return IGNORED
        rest, sep2, name = head.rpartition("/")
        node, sep3, component = rest.rpartition("/")
        if not (sep2 and sep3 and node and name):
            raise ParseError("unknown_topic", f"{topic!r} is not an ESPHome topic")
        if component != "sensor" or last != "state":
            if last in ("state", "command") or last.endswith("_state") or last.endswith(
                "_command"
            ):
                return IGNORED  # switches, binary/text sensors, lights, commands, ...
            raise ParseError("unknown_topic", f"{topic!r} is not an ESPHome topic")
        kind = self._kinds[name] if name in self._kinds else self._classify(name)
        if kind is None:
            return IGNORED
        device = f"esphome/{node}/{name}"
        value = text_measurement(payload, device)
        is_energy, scope = kind
        if is_energy:
            kwh = kwh_from_wh(value) if self._energy_in_wh else value
            return ParseResult(readings=(
                Reading(device, received_at, TsSource.RECEIVED, None, kwh, scope),
            ))
        watts = w_from_kw(value) if self._power_in_kw else value
        return ParseResult(readings=(Reading(device, received_at, TsSource.RECEIVED, watts),))

    def _classify(self, name: str) -> _Kind:
        if name in self._ignore_names:
            kind: _Kind = None
        elif name in self._power_names:
            kind = _POWER
        elif name in self._energy_names:
            kind = (True, _energy_scope(name.lower()))
        else:
            low = name.lower()
            if "yesterday" in low:
                kind = None
            elif "energy" in low or "kwh" in low:
                kind = (True, _energy_scope(low))
            elif "factor" in low or "reactive" in low or "apparent" in low:
                kind = None
            elif "power" in low or "watt" in low:
                kind = _POWER
            elif any(word in low for word in _OTHER_QUANTITIES):
                kind = None
            else:
                raise ParseError(
                    "no_measurement",
                    f"sensor {name!r} is neither power nor energy by its name; list it in "
                    "the source's power_sensors, energy_sensors or ignore_sensors option",
                )
        self._kinds[name] = kind
        return kind


def _energy_scope(low: str) -> EnergyScope:
    return EnergyScope.DAILY if "daily" in low or "today" in low else EnergyScope.LIFETIME


def _unit(opts: Mapping[str, object], key: str, default: str, table: Mapping[str, bool]) -> bool:
    raw = opts.get(key, default)
    convert = table.get(raw.strip().lower()) if isinstance(raw, str) else None
    if convert is None:
        names = " or ".join(("W", "kW") if "w" in table else ("Wh", "kWh"))
        raise ValueError(f"format 'esphome': option {key!r} must be {names}, got {raw!r}")
    return convert

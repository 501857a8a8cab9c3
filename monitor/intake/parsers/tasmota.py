"""Tasmota: ``<...>/SENSOR`` JSON with an ``ENERGY`` object, ``<...>/LWT`` availability.

Device id: FullTopic can be customised (``%prefix%/%topic%/`` by default), so
the id is every *variable* segment of the topic except the structural ones: the
last segment (``SENSOR``, ``LWT``, ...) and the ``%prefix%`` segment (``tele``,
``stat``).  With the source's ``topic_filter`` the variable segments are those
matched by ``+`` and ``#``; without one, all of them.  ``tele/pow1/SENSOR``
gives ``tasmota/pow1``; ``site/tele/hall/rig7/SENSOR`` gives
``tasmota/site/hall/rig7`` (or ``tasmota/hall/rig7`` under the filter
``site/tele/+/+/SENSOR``).  Two topics that differ only in where the prefix
segment sits (``a/tele/b`` and ``a/b/tele``) would give one id: the second
layout seen is the dead letter ``device_id_collision``.

Read from ``ENERGY``: ``Power`` W (signed), ``Total`` kWh (imported, lifetime;
``EnergyTotal`` can reset it), ``ExportActive`` kWh (exported).  Skipped with a
reason: ``Today``/``Yesterday`` (daily_total), ``Period`` (interval_energy),
``ApparentPower``, ``ReactivePower``, the reactive counters, ``ImportActive``
(the same quantity as ``Total``: duplicate_counter) and the tariff counters.
Meter objects other than ``ENERGY`` (Smart Meter Interface / SML scripts, whose
key names the user chooses) are read with the options ``meter_object``,
``energy_key``, ``export_key``, ``power_key``, ``energy_unit``; without them
such a SENSOR is the dead letter ``unconfigured_meter`` naming its keys.

``Time`` is local time without an offset and is 1970 until the clock is
synced, so readings are always stamped on receipt and the device time is kept
in ``device_ts`` only (read as UTC when it has no offset; ``Epoch`` wins).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from monitor.core.model import ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers.common import (
    Values,
    aux,
    check_options,
    epoch,
    ignored,
    kind,
    kwh_from_wh,
    load_json,
    online,
    str_option,
    w_from_kw,
)

_PREFIXES = frozenset({"tele", "stat", "cmnd"})
_OPTIONS = ("meter_object", "energy_key", "export_key", "power_key", "energy_unit", "power_unit")
#: ENERGY keys that are never read, and why.
_SKIP = {
    "Today": "daily_total", "Yesterday": "daily_total", "Period": "interval_energy",
    "ApparentPower": "apparent_power", "ReactivePower": "reactive_power",
    "ImportReactive": "reactive_energy", "ExportReactive": "reactive_energy",
    "TotalReactive": "reactive_energy", "TotalTariff": "tariff_counter",
    "ExportTariff": "tariff_counter",
}
#: Words in a key of a non-ENERGY object that suggest a meter (SML, scripts).
_METER_WORDS = ("total", "power", "energy", "import", "export", "_in", "_out", "kwh", "watt",
                "consumption", "bezug", "einspeis", "verbrauch", "lieferung")
_MAX_LAYOUTS = 65536  # bound on the ids remembered for the collision check


class TasmotaParser:
    """Parser for ``format = "tasmota"``.  Remembers each id's topic layout."""

    def __init__(
        self, options: Mapping[str, object] | None = None, registry: object = None,
        topic_filter: str | None = None,
    ) -> None:
        opts = check_options("tasmota", options, _OPTIONS)
        self._filter = topic_filter.split("/") if topic_filter else None
        self._object = str(opts["meter_object"]).strip() if "meter_object" in opts else ""
        self._keys = {
            key: str_option("tasmota", opts, key, "-") if key in opts else ""
            for key in ("energy_key", "export_key", "power_key")
        }
        if any(self._keys.values()) and not self._object:
            raise ValueError("format 'tasmota': energy_key/export_key/power_key need meter_object")
        if self._object and not (self._keys["energy_key"] or self._keys["power_key"]):
            raise ValueError("format 'tasmota': meter_object needs energy_key or power_key")
        self._wh = _unit(opts, "energy_unit", "kWh", {"kwh": False, "wh": True})
        self._kw = _unit(opts, "power_unit", "W", {"w": False, "kw": True})
        self._layouts: dict[str, tuple[str, ...]] = {}

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        segs = topic.split("/")
        last = segs[-1]
        if len(segs) >= 2 and last.isupper() and last not in ("SENSOR", "LWT"):
            # STATE, RESULT, INFO1, UPTIME, POWER1, STATUS8, ...
            if "cmnd" in segs[:-1]:
                return ignored("command")
            return ignored("state_without_energy" if last == "STATE" else "not_energy_topic")
        if last not in ("SENSOR", "LWT"):
            raise ParseError("unknown_topic", f"{topic!r} does not end in a Tasmota suffix")
        device = "tasmota/" + self._device(topic, segs)
        if last == "LWT":
            return online(payload, device)
        return self._sensor(device, payload, received_at)

    # ------------------------------------------------------------------ identity

    def _variable(self, segs: list[str]) -> list[int]:
        """Indices of the topic segments the source's filter leaves open (all without one)."""
        f = self._filter
        if f is None:
            return list(range(len(segs) - 1))
        out: list[int] = []
        for i, part in enumerate(f):
            if part == "#":
                return out + list(range(i, len(segs) - 1))
            if i >= len(segs) or (part != "+" and part != segs[i]):
                return list(range(len(segs) - 1))  # not this filter's topic: all segments
            if part == "+" and i < len(segs) - 1:
                out.append(i)
        if len(f) != len(segs):
            return list(range(len(segs) - 1))
        return out

    def _device(self, topic: str, segs: list[str]) -> str:
        kept: list[str] = []
        layout: list[str] = []
        for i in self._variable(segs):
            if segs[i] in _PREFIXES:
                layout.append("%prefix%")
            else:
                kept.append(segs[i])
                layout.append(segs[i])
        if not kept or not all(kept):
            raise ParseError("unknown_topic", f"no device topic in {topic!r}")
        name = "/".join(kept)
        shape = tuple(layout)
        seen = self._layouts.get(name)
        if seen is None:
            if len(self._layouts) < _MAX_LAYOUTS:
                self._layouts[name] = shape
        elif seen != shape:
            raise ParseError(
                "device_id_collision",
                f"{topic!r} gives device id tasmota/{name}, which a topic of another "
                "FullTopic layout already has; give the devices distinct topics",
            )
        return name

    # ------------------------------------------------------------------ payload

    def _sensor(self, device: str, payload: bytes, received_at: float) -> ParseResult:
        doc = load_json(payload)
        if not isinstance(doc, dict):
            raise ParseError("wrong_type", f"SENSOR payload is {kind(doc)}, expected an object")
        device_ts = _device_time(doc)
        energy = doc.get("ENERGY")
        if energy is not None:
            if not isinstance(energy, dict):
                raise ParseError("wrong_type", f"ENERGY is {kind(energy)}, expected an object")
            return _energy(device, energy, received_at, device_ts)
        if self._object and self._object in doc:
            return self._meter_object(device, doc[self._object], received_at, device_ts)
        for name, obj in doc.items():
            if isinstance(obj, dict):
                keys = [k for k, v in obj.items() if isinstance(k, str) and _looks_metered(k, v)]
                if keys:
                    raise ParseError(
                        "unconfigured_meter",
                        f"SENSOR carries the meter object {name[:40]!r} with "
                        f"{', '.join(k[:30] for k in keys[:6])}; set the source's options "
                        f"meter_object = {name[:40]!r}, energy_key, power_key (and export_key, "
                        "energy_unit) to read it",
                    )
        return ignored("no_energy_sensor")  # temperature, humidity, analog inputs, ...

    def _meter_object(
        self, device: str, obj: object, received_at: float, device_ts: float | None
    ) -> ParseResult:
        if not isinstance(obj, dict):
            raise ParseError("wrong_type", f"{self._object} is {kind(obj)}, expected an object")
        vals = Values()
        got: dict[str, float | None] = {}
        for key, name in self._keys.items():
            if name and name in obj:
                where = f"{self._object}.{name}"
                got[key] = vals.power(obj[name], where) if key == "power_key" \
                    else vals.counter(obj[name], where)
        power = got.get("power_key")
        if power is not None and self._kw:
            power = w_from_kw(power)
        energy, export = got.get("energy_key"), got.get("export_key")
        if self._wh:
            energy = None if energy is None else kwh_from_wh(energy)
            export = None if export is None else kwh_from_wh(export)
        readings = []
        if power is not None or energy is not None or export is not None:
            readings.append(Reading(device, received_at, TsSource.RECEIVED, power, energy,
                                    device_ts=device_ts, export_kwh=export))
        return vals.result(readings)


def _looks_metered(key: str, value: object) -> bool:
    if type(value) is not int and type(value) is not float:
        return False
    low = key.lower()
    return any(word in low for word in _METER_WORDS)


def _energy(
    device: str, energy: Mapping[str, object], received_at: float, device_ts: float | None
) -> ParseResult:
    vals = Values()
    for key, why in _SKIP.items():
        if key in energy:
            vals.skip(why)
    power = energy.get("Power")
    total = energy.get("Total")
    export = energy.get("ExportActive")
    if total is None and "ImportActive" in energy:
        total = energy["ImportActive"]  # SDM-style drivers without Total
    elif "ImportActive" in energy:
        vals.skip("duplicate_counter")
    voltage = energy.get("Voltage")
    current = energy.get("Current")
    if power is None and total is None and export is None:
        if vals.skipped:
            return vals.result()
        raise ParseError("no_measurement", "ENERGY has neither Power nor Total")

    if isinstance(total, list) or (total is None and isinstance(power, list)):
        # Per-channel counters (Dual R3, SetOption129 1) or per-channel power only.
        n = len(total) if isinstance(total, list) else len(power)  # type: ignore[arg-type]
        if n == 0:
            raise ParseError("wrong_type", "ENERGY arrays are empty")
        powers = _per_channel(vals, power, n, "Power", counter=False)
        totals = _per_channel(vals, total, n, "Total", counter=True)
        exports = _per_channel(vals, export, n, "ExportActive", counter=True)
        readings = []
        for i in range(n):
            if powers[i] is None and totals[i] is None and exports[i] is None:
                continue
            readings.append(Reading(
                f"{device}:{i + 1}", received_at, TsSource.RECEIVED, powers[i], totals[i],
                voltage_v=_pick(voltage, i, n, shared=True),
                current_a=_pick(current, i, n, shared=False),
                device_ts=device_ts, export_kwh=exports[i],
            ))
        return vals.result(readings)

    if isinstance(power, list):
        # One combined Total for all channels (3 PZEM phases, SetOption129 0): the counter
        # belongs to the sum of the channels, so they are one meter.
        power_w: float | None = 0.0
        if not power:
            vals.bad(ParseError("wrong_type", "ENERGY Power is an empty array"))
            power_w = None
        for i, p in enumerate(power, 1):
            x = vals.power(p, f"ENERGY.Power[{i}]")
            if x is None or power_w is None:
                power_w = None  # a sum with a phase missing is not the device's power
            else:
                power_w += x
    else:
        power_w = None if power is None else vals.power(power, "ENERGY.Power")
    if isinstance(export, list):
        vals.skip("phase_sum" if export else "wrong_type")
        export = None
    total_kwh = None if total is None else vals.counter(total, "ENERGY.Total")
    export_kwh = None if export is None else vals.counter(export, "ENERGY.ExportActive")
    readings = []
    if power_w is not None or total_kwh is not None or export_kwh is not None:
        readings.append(Reading(
            device, received_at, TsSource.RECEIVED, power_w, total_kwh,
            voltage_v=aux(voltage) if not isinstance(voltage, list) else None,
            current_a=aux(current), device_ts=device_ts, export_kwh=export_kwh,
        ))
    return vals.result(readings)


def _per_channel(
    vals: Values, value: object, n: int, name: str, *, counter: bool
) -> list[float | None]:
    """Channel values of an ENERGY array field; a scalar or wrong-length array is skipped."""
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        vals.bad(ParseError("wrong_type", f"ENERGY {name} does not have {n} channels"))
        return [None] * n
    read = vals.counter if counter else vals.power
    return [read(v, f"ENERGY.{name}[{i + 1}]") for i, v in enumerate(value)]


def _pick(value: object, i: int, n: int, *, shared: bool) -> float | None:
    """Channel ``i`` of an array field; a scalar applies to every channel only if ``shared``."""
    if isinstance(value, list):
        return aux(value[i]) if len(value) == n else None
    return aux(value) if shared else None


def _unit(opts: Mapping[str, object], key: str, default: str, table: Mapping[str, bool]) -> bool:
    raw = opts.get(key, default)
    convert = table.get(raw.strip().lower()) if isinstance(raw, str) else None
    if convert is None:
        raise ValueError(f"format 'tasmota': option {key!r} has an unknown unit {raw!r}")
    return convert


def _device_time(doc: Mapping[str, object]) -> float | None:
    ts = epoch(doc.get("Epoch"))
    if ts is not None:
        return ts
    raw = doc.get("Time")
    if not isinstance(raw, str):
        return None
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        return when.timestamp()
    except (OverflowError, ValueError):
        return None

"""Tasmota: ``<...>/SENSOR`` JSON with an ``ENERGY`` object, ``<...>/LWT`` availability.

FullTopic can be customised, so the device topic is found by shape, not by
position: drop the last segment (SENSOR, STATE, LWT, ...), drop any segment
equal to ``tele`` or ``stat``; the last segment left is the device topic.
``tele/pow1/SENSOR``, ``pow1/tele/SENSOR`` and
``emoncms/ch2i/factory/pow1/tele/SENSOR`` all give ``tasmota/pow1``.

Units: ``Power`` W, ``Total`` kWh (lifetime counter; ``EnergyTotal`` can reset
it).  ``Time`` is local time without an offset and is 1970 until the clock is
synced, so readings are always stamped on receipt and the device time is kept
in ``device_ts`` only (read as UTC when it has no offset; ``Epoch`` wins).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from monitor.model import ParseError, ParseResult, Reading, TsSource
from monitor.parsers.common import (
    IGNORED,
    aux,
    check_options,
    epoch,
    kind,
    load_json,
    measurement,
    online,
)

_PREFIXES = frozenset({"tele", "stat"})


class TasmotaParser:
    """Parser for ``format = "tasmota"``.  Stateless; no options."""

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        check_options("tasmota", options, ())

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        head, sep, last = topic.rpartition("/")
        name = ""
        if sep:
            for seg in reversed(head.split("/")):
                if seg not in _PREFIXES:
                    name = seg
                    break
        if not name:
            raise ParseError("unknown_topic", f"no device topic in {topic!r}")
        device = "tasmota/" + name
        if last == "SENSOR":
            return _sensor(device, payload, received_at)
        if last == "LWT":
            return online(payload, device)
        if last.isupper():  # STATE, RESULT, INFO1, UPTIME, POWER1, STATUS8, ...
            return IGNORED
        raise ParseError("unknown_topic", f"{topic!r} does not end in a Tasmota suffix")


def _sensor(device: str, payload: bytes, received_at: float) -> ParseResult:
    doc = load_json(payload)
    if not isinstance(doc, dict):
        raise ParseError("wrong_type", f"SENSOR payload is {kind(doc)}, expected an object")
    energy = doc.get("ENERGY")
    if energy is None:
        return IGNORED  # other sensors only (temperature, SML, ...): not read
    if not isinstance(energy, dict):
        raise ParseError("wrong_type", f"ENERGY is {kind(energy)}, expected an object")
    has_power = "Power" in energy
    has_total = "Total" in energy
    if not has_power and not has_total:
        raise ParseError("no_measurement", "ENERGY has neither Power nor Total")
    power = energy.get("Power")
    total = energy.get("Total")
    voltage = energy.get("Voltage")
    current = energy.get("Current")
    device_ts = _device_time(doc)

    if isinstance(total, list):
        # Per-channel counters (Dual R3, SetOption129 1): one meter per channel.
        n = len(total)
        if has_power and (not isinstance(power, list) or len(power) != n):
            raise ParseError("wrong_type", "ENERGY Power and Total arrays differ in length")
        return _channels(
            device, n, power=power if has_power else None, total=total, voltage=voltage,
            current=current, received_at=received_at, device_ts=device_ts,
        )
    if isinstance(power, list):
        if not has_total:
            return _channels(
                device, len(power), power=power, total=None, voltage=voltage,
                current=current, received_at=received_at, device_ts=device_ts,
            )
        # One combined Total for all channels (multi-channel or 3-phase with
        # SetOption129 0): the counter belongs to the sum of the channels, so
        # they are one meter; splitting would separate power from its energy.
        if not power:
            raise ParseError("wrong_type", "ENERGY Power is an empty array")
        power_w = 0.0
        for i, p in enumerate(power, 1):
            power_w += measurement(p, f"ENERGY.Power[{i}]")
        return ParseResult(readings=(Reading(
            device, received_at, TsSource.RECEIVED, power_w, measurement(total, "ENERGY.Total"),
            voltage_v=aux(voltage), device_ts=device_ts,
        ),))
    return ParseResult(readings=(Reading(
        device, received_at, TsSource.RECEIVED,
        measurement(power, "ENERGY.Power") if has_power else None,
        measurement(total, "ENERGY.Total") if has_total else None,
        voltage_v=aux(voltage), current_a=aux(current), device_ts=device_ts,
    ),))


def _channels(
    device: str,
    n: int,
    *,
    power: list[object] | None,
    total: list[object] | None,
    voltage: object,
    current: object,
    received_at: float,
    device_ts: float | None,
) -> ParseResult:
    if n == 0:
        raise ParseError("wrong_type", "ENERGY arrays are empty")
    readings = []
    for i in range(n):
        ch = i + 1
        readings.append(Reading(
            f"{device}:{ch}", received_at, TsSource.RECEIVED,
            measurement(power[i], f"ENERGY.Power[{ch}]") if power is not None else None,
            measurement(total[i], f"ENERGY.Total[{ch}]") if total is not None else None,
            voltage_v=_pick(voltage, i, n, shared=True),
            current_a=_pick(current, i, n, shared=False),
            device_ts=device_ts,
        ))
    return ParseResult(readings=tuple(readings))


def _pick(value: object, i: int, n: int, *, shared: bool) -> float | None:
    """Channel ``i`` of an array field; a scalar applies to every channel only if ``shared``."""
    if isinstance(value, list):
        return aux(value[i]) if len(value) == n else None
    return aux(value) if shared else None


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
    return when.timestamp()

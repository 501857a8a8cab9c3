"""The native ``json`` format (SPEC "Device formats and meter ids").

One object, or a JSON array of objects (a batch)::

    {"meter": "rack-07", "ts": "2026-11-27T02:00:00Z", "power_w": 3250.0,
     "energy_kwh": 10234.125, "voltage_v": 229.8, "current_a": 14.2, "seq": 1234}

``power_w`` is signed (negative = production, never load); ``energy_kwh`` is the
imported active energy counter and ``export_kwh`` the exported one (both >= 0).

The device id is the ``meter`` string as is.  A batch is all or nothing: one bad
element makes the whole message a ParseError whose detail names the index, so a
batch is never half applied.  Unknown keys are ignored (room for additions).
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.core.model import ParseError, ParseResult, Reading, TsSource
from monitor.intake.parsers.common import (
    MIN_DEVICE_TS,
    check_options,
    epoch,
    kind,
    load_json,
    measurement,
    number,
    rfc3339,
)


class NativeParser:
    """Parser for ``format = "json"``.  Stateless; no options."""

    def __init__(
        self, options: Mapping[str, object] | None = None, registry: object = None,
        topic_filter: str | None = None,
    ) -> None:
        check_options("json", options, ())

    def parse(
        self, topic: str, payload: bytes, received_at: float, retained: bool = False
    ) -> ParseResult:
        doc = load_json(payload)
        if isinstance(doc, dict):
            return ParseResult(readings=(_reading(doc, received_at, ""),))
        if isinstance(doc, list):
            if not doc:
                raise ParseError("empty", "empty batch []")
            return ParseResult(
                readings=tuple(_reading(el, received_at, f"[{i}] ") for i, el in enumerate(doc))
            )
        raise ParseError("wrong_type", f"expected a JSON object or array, got {kind(doc)}")


def _reading(obj: object, received_at: float, where: str) -> Reading:
    try:
        return _read_object(obj, received_at)
    except ParseError as exc:
        if not where:
            raise
        raise ParseError(exc.reason, f"{where}{exc.detail}") from None


def _read_object(obj: object, received_at: float) -> Reading:
    if not isinstance(obj, dict):
        raise ParseError("wrong_type", f"expected an object, got {kind(obj)}")
    meter = obj.get("meter")
    if meter is None:
        raise ParseError("missing_field", "meter")
    if not isinstance(meter, str) or not meter.strip():
        raise ParseError("wrong_type", f"meter must be a non-empty string, got {kind(meter)}")

    power_w = number(obj["power_w"], "power_w") if "power_w" in obj else None
    energy_kwh = measurement(obj["energy_kwh"], "energy_kwh") if "energy_kwh" in obj else None
    export_kwh = measurement(obj["export_kwh"], "export_kwh") if "export_kwh" in obj else None
    if power_w is None and energy_kwh is None and export_kwh is None:
        raise ParseError("no_measurement",
                         f"meter {meter!r} has none of power_w, energy_kwh, export_kwh")
    voltage_v = measurement(obj["voltage_v"], "voltage_v") if "voltage_v" in obj else None
    current_a = measurement(obj["current_a"], "current_a") if "current_a" in obj else None

    seq = obj.get("seq")
    if seq is not None:
        if type(seq) is not int:
            raise ParseError("wrong_type", f"seq must be an integer, got {kind(seq)}")
        if seq < 0:
            raise ParseError("negative", f"seq is {seq}")

    raw_ts = obj.get("ts")
    if raw_ts is None:  # absent or null: stamped on receipt
        return Reading(
            meter, received_at, TsSource.RECEIVED, power_w, energy_kwh,
            voltage_v=voltage_v, current_a=current_a, seq=seq, export_kwh=export_kwh,
        )
    ts = _timestamp(raw_ts)
    return Reading(
        meter, ts, TsSource.DEVICE, power_w, energy_kwh,
        voltage_v=voltage_v, current_a=current_a, device_ts=ts, seq=seq, export_kwh=export_kwh,
    )


def _timestamp(raw: object) -> float:
    if isinstance(raw, str):
        ts = rfc3339(raw)
        if ts is None:
            raise ParseError("bad_timestamp", f"ts {raw[:40]!r} is not RFC 3339 with an offset")
    else:
        ts = epoch(raw)  # None for booleans and non-finite numbers too
        if ts is None:
            raise ParseError("bad_timestamp", f"ts is {kind(raw)}, expected RFC 3339 or Unix s")
    if ts < MIN_DEVICE_TS:
        raise ParseError("bad_timestamp", f"ts {raw!r} is before 2000 (clock not set?)")
    return ts
